"""Logit Correction (LC) against spurious correlations, on coloured digits, in one file.

Paper: Liu, Zhang, Sekhar, Wu, Singhal, Fernandez-Granda, "Avoiding spurious correlations via logit
correction", ICLR 2023, arXiv 2212.01433 (official code: github.com/shengliu66/LC). Baselines: LfF
(Nam et al., "Learning from Failure", NeurIPS 2020) and GroupDRO (Sagawa et al., ICLR 2020).

The story: a digit's colour predicts its label for all but a fraction rho of the training images. A plain
classifier (ERM) learns the colour and fails on a test set where colours are random. LC trains a second,
deliberately biased network whose prediction stands in for the unknown colour ("pseudo-attribute" a_x),
estimates the group prior Delta[y, a] = P(y, a), and trains the main network on corrected logits
f(x) + ln Delta[:, a_x]: rare (y, a) groups then need a large margin, which is the group-balanced optimum.
Group MixUp mixes each sample with a same-class minority sample to make the rare groups less rare.

Legend (shapes):  B = batch, C = 10 classes (= 10 colours / attributes), D = 3*28*28 = 2352 input dims,
                  N = training set size, G = C*C groups (y, a).
Methods (--methods):
  erm         plain cross-entropy
  groupdro    online GroupDRO over the 100 (y, a) groups -- an ORACLE: it reads the true colour labels
  lff         Learning from Failure: GCE-biased net + relative-difficulty reweighting of the main net's CE
  lc          logit correction + Group MixUp (the paper's method)
  lc_nomix    logit correction on clean inputs (ablation)
  mixup_only  Group MixUp with plain CE (ablation)

Run:  python logit_correction.py                 # ERM vs LC at rho = 1%, one seed, a few minutes on a CPU
      python logit_correction.py --sweep         # erm, lff, lc_nomix, lc x rho 0.5/1/2/5 x seeds 1,2,3
      python logit_correction.py --data-dir DIR  # MNIST-format IDX files instead of procedural digits
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import digits

# ----------------------------------------------------------------------------------------------------------
# Config: every default in one block, turned into argparse flags below.

@dataclass
class Config:
    methods: str = "erm,lc"        # comma list, see the legend
    ratios: str = "1"              # bias-conflicting percentages rho in the training split
    seeds: str = "1"
    sweep: bool = False            # methods erm,lff,lc_nomix,lc x ratios 0.5,1,2,5 x seeds 1,2,3
    data_dir: str = ""             # MNIST-format IDX folder; empty = procedural digits
    n_train: int = 10000           # procedural sizes (IDX data: all of train minus n_val, all of t10k)
    n_val: int = 2000
    n_test: int = 10000
    data_seed: int = 0             # the grey digits and the val/test colours; fixed across runs
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3               # Adam; the paper lists 1e-2 or 1e-3 for Colored MNIST
    q: float = 0.7                 # GCE exponent
    lambda_b: float = 1.0          # weight of the biased net's GCE loss
    prior_momentum: float = 0.99   # moving average of the per-batch P(y, a) estimate
    prior_eps: float = 1e-4        # floor for ln Delta (the official code's log(1e-4) for unseen cells)
    mix_ramp: int = 5              # epochs over which the minority weight of Group MixUp ramps up
    mix_pool: str = "batch"        # where Group MixUp finds minority partners: batch (official code) | global
    lff_ema: float = 0.7           # LfF's per-sample loss EMA
    dro_eta: float = 0.01          # GroupDRO step size for the group weights
    margins: bool = False          # print the majority/minority margin table (paper Fig. 4)
    report: str = ""               # reprint the tables of an existing results.json, train nothing
    device: str = "auto"
    threads: int = 0               # torch CPU threads; 0 = torch's default
    log_every: int = 5             # epochs between log lines
    out: str = "out/logit_correction"


HELP = {
    "methods": "comma list of erm, groupdro, lff, lc, lc_nomix, mixup_only",
    "ratios": "comma list of bias-conflicting percentages rho in (0, 100)",
    "seeds": "comma list of integer seeds (one run per method x ratio x seed)",
    "sweep": "grid erm,lff,lc_nomix,lc x 0.5,1,2,5 x seeds 1,2,3 (flags given explicitly still win)",
    "data_dir": "folder with MNIST-format IDX files (train-images-idx3-ubyte, ... optionally .gz)",
    "n_train": "procedural training images", "n_val": "validation images (IDX data: held out of train)",
    "n_test": "procedural test images", "data_seed": "seed of the grey digits and of the val/test colours",
    "epochs": "training epochs per run", "batch_size": "minibatch size", "lr": "Adam learning rate",
    "q": "GCE exponent q", "lambda_b": "weight of the biased net's GCE loss",
    "prior_momentum": "moving-average momentum of the group prior Delta",
    "prior_eps": "floor of Delta before the log", "mix_ramp": "Group MixUp ramp-up epochs",
    "mix_pool": "Group MixUp partners from the batch's pseudo-minority (official code) or the whole training set",
    "lff_ema": "LfF per-sample loss EMA", "dro_eta": "GroupDRO group-weight step size",
    "margins": "also print majority/minority margins per method (paper Fig. 4)",
    "report": "path of a results.json: print its tables (with --margins: the margin table too), train nothing",
    "device": "auto (cuda, then mps, else cpu), cpu, cuda, mps", "threads": "torch CPU threads, 0 = default",
    "log_every": "epochs between log lines", "out": "output folder for results.json and checkpoints",
}
METHODS = ("erm", "groupdro", "lff", "lc", "lc_nomix", "mixup_only")
TWO_NETS = ("lff", "lc", "lc_nomix", "mixup_only")     # methods with a GCE-biased auxiliary network
SWEEP = {"methods": "erm,lff,lc_nomix,lc", "ratios": "0.5,1,2,5", "seeds": "1,2,3"}

# Unbiased test accuracy (%) on Colored MNIST: the LC paper's Table 1, and DeNetDM's independent 5-seed re-run.
PAPER = {"erm": (35.19, 52.09, 65.86, 82.17), "lff": (52.50, 61.89, 71.03, 80.57),
         "lc": (71.25, 82.25, 86.21, 91.15), "groupdro": (63.12, 68.78, 76.30, 84.20)}
DENETDM = {"erm": (35.34, 50.34, 62.29, 77.63), "lff": (63.39, 74.01, 80.48, 85.39), "lc": (63.48, 78.41, 83.63, 88.18)}
PAPER_RATIOS = (0.5, 1.0, 2.0, 5.0)


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------
# Data: grey digits once per invocation; the training split is coloured per (ratio, seed), val/test once.

def load_grey(cfg):
    """dict of numpy arrays: train/val/test grey images (N, 28, 28) and labels (N,)."""
    if cfg.data_dir:
        try:
            tx, ty, sx, sy = digits.load_idx_dataset(cfg.data_dir)
        except digits.IDXError as e:
            raise UsageError(str(e)) from None
        if len(tx) <= cfg.n_val:
            raise UsageError(f"--data-dir {cfg.data_dir}: {len(tx)} training images, need more than --n-val {cfg.n_val}")
        perm = np.random.default_rng(cfg.data_seed).permutation(len(tx))
        tr, va = perm[cfg.n_val:], perm[:cfg.n_val]
        return dict(train_x=tx[tr], train_y=ty[tr], val_x=tx[va], val_y=ty[va], test_x=sx, test_y=sy)
    d = {}
    for i, (split, n) in enumerate((("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))):
        d[split + "_x"], d[split + "_y"] = digits.procedural_split(n, cfg.data_seed * 1000 + i)
    return d


def colour_eval_splits(grey, cfg, device):
    """Unbiased validation and test sets: every (class, colour) cell equally often. Fixed by data_seed."""
    out = {}
    for i, split in enumerate(("val", "test")):
        rng = np.random.default_rng([cfg.data_seed, 100 + i])
        x, a = digits.colour_uniform(grey[split + "_x"], grey[split + "_y"], rng)
        out[split] = [torch.from_numpy(v).to(device) for v in (x, grey[split + "_y"], a)]   # x (n, 3, 28, 28)
    return out


def colour_train(grey, ratio, seed, device):
    """Biased training split for one (ratio, seed): x (N, 3, 28, 28), y (N,), true colour a (N,)."""
    rng = np.random.default_rng([seed, int(round(ratio * 1000)), 7])
    x, a = digits.colour_biased(grey["train_x"], grey["train_y"], ratio, rng)
    return [torch.from_numpy(v).to(device) for v in (x, grey["train_y"], a)]


# ----------------------------------------------------------------------------------------------------------
# Model: the MLP of LfF and LC for Colored MNIST, 784*3 -> 100 -> 100 -> 16 -> 10, ReLU (~250k parameters).
# No torch.compile or bf16 autocast: the network is tiny and fp32 keeps CPU runs bit-reproducible; checkpoints
# still strip a `_orig_mod.` prefix in case a reader compiles it.

def mlp(C=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 16), nn.ReLU(), nn.Linear(16, C))


# ----------------------------------------------------------------------------------------------------------
# Losses. Each returns per-sample values (B,); the training loop takes means.

def gce_loss(logits_BC, y_B, q=0.7):
    """Generalized cross-entropy (Zhang & Sabuncu 2018): GCE = (1 - p_y^q) / q.
    Its gradient is p_y^q * grad CE: confidently-classified (easy, here: colour-aligned) samples dominate,
    which is what makes the auxiliary network *biased*. (LfF's code writes CE * q * p_y^q with p detached:
    the same gradient times q.)"""
    p_y = F.softmax(logits_BC, 1).gather(1, y_B[:, None]).squeeze(1)     # (B,)
    return (1 - p_y.clamp_min(1e-12) ** q) / q


def corrected_logits(logits_BC, delta_BC, eps=1e-4):
    """f(x) + ln Delta[:, a_x]: delta_BC[b] is the prior column Delta[:, a_b] (mixed, for Group MixUp)."""
    return logits_BC + torch.log(delta_BC.clamp_min(eps))


def lc_loss(logits_BC, y_B, delta_BC, eps=1e-4):
    """L_LC = CE(f(x) + ln Delta[:, a_x], y). Train with corrected logits, *predict with raw logits*:
    argmax_y f_y(x) is then the group-balanced rule argmax_y [p(y|x) / P(y, a_x)] (paper Sec. 3)."""
    return F.cross_entropy(corrected_logits(logits_BC, delta_BC, eps), y_B, reduction="none")


# Group prior. Two estimators exist: the paper's moving average of per-batch estimates of P(y, a), and the
# official code's per-sample EMA matrix C[y, a] filled with the biased net's probability of the true label
# and sharpened by a temperature. We implement the PAPER's: it is the one the paper's derivation uses, it needs
# no per-sample memory and no extra temperature, and every entry is a plain frequency a reader can check
# (Delta sums to 1; with a uniform Delta the LC loss is exactly CE).
def update_prior(delta_CC, y_B, a_B, momentum):
    """Delta <- m * Delta + (1 - m) * P_batch(y, a), P_batch = counts of (y, pseudo-attribute a) / B."""
    C = delta_CC.shape[0]
    p_batch = torch.bincount(y_B * C + a_B, minlength=C * C).view(C, C).float() / len(y_B)
    return momentum * delta_CC + (1 - momentum) * p_batch


def minority_pools(y_N, a_mem_N, C=10):
    """Per class k, the indices whose pseudo-attribute is not k (the pseudo-minority of class k).
    --mix-pool global: over the whole training set, rebuilt once per epoch from the latest pseudo-attributes.
    --mix-pool batch (the official code's choice): over the current batch only (pass the batch's y, a, idx)."""
    return [((y_N == k) & (a_mem_N != k)).nonzero().squeeze(1) for k in range(C)]


def pick_partners(y_B, idx_B, pools, gen, fallback="self"):
    """Group MixUp partners: for each sample of class k a uniformly random minority sample of class k from
    pools[k]. A class with no minority sample pairs each sample with itself (fallback="self", a no-op mix) or
    with a random same-class sample of the batch (fallback="class", plain within-class MixUp, as the official
    code does). Returns training-set indices (B,)."""
    part = idx_B.clone()
    for k, pool in enumerate(pools):
        rows = (y_B == k).nonzero().squeeze(1)
        if len(rows) and len(pool):
            pick = torch.randint(len(pool), (len(rows),), generator=gen).to(pool.device)
            part[rows] = pool[pick]
        elif len(rows) and fallback == "class":
            part[rows] = idx_B[rows][torch.randperm(len(rows), generator=gen).to(rows.device)]
    return part


def group_mixup(x_i, x_j, delta_i, delta_j, lam_B):
    """x' = lam x_i + (1 - lam) x_j and Delta' = lam Delta_i + (1 - lam) Delta_j with the SAME lam per sample."""
    lx = lam_B.view(-1, *([1] * (x_i.dim() - 1)))
    return lx * x_i + (1 - lx) * x_j, lam_B[:, None] * delta_i + (1 - lam_B[:, None]) * delta_j


def margins(logits_BC, y_B):
    """Classification margin f_y(x) - max_{y' != y} f_y'(x), (B,)."""
    f_y = logits_BC.gather(1, y_B[:, None]).squeeze(1)
    other = logits_BC.scatter(1, y_B[:, None], float("-inf")).amax(1)
    return f_y - other


# ----------------------------------------------------------------------------------------------------------
# Evaluation.

@torch.no_grad()
def predict(net, x, bs=2048):
    return torch.cat([net(x[i:i + bs]) for i in range(0, len(x), bs)])


@torch.no_grad()
def evaluate(net, x, y, a, C=10):
    """Accuracies in %: unbiased = mean over the non-empty (y, a) groups (group-balanced accuracy),
    aligned (a == y), conflicting (a != y), worst group."""
    correct = (predict(net, x).argmax(1) == y).float()
    g = y * C + a
    n_g = torch.bincount(g, minlength=C * C).float()
    acc_g = torch.bincount(g, weights=correct, minlength=C * C) / n_g.clamp_min(1)
    seen = n_g > 0
    al = a == y
    return {"unbiased": 100 * acc_g[seen].mean().item(), "aligned": 100 * correct[al].mean().item(),
            "conflicting": 100 * correct[~al].mean().item(), "worst_group": 100 * acc_g[seen].min().item()}


@torch.no_grad()
def margin_stats(net, x, y, a):
    """Mean margin on bias-aligned (majority) and bias-conflicting (minority) samples, by TRUE attribute."""
    m = margins(predict(net, x), y)
    maj, mino = m[a == y].mean().item(), m[a != y].mean().item()
    return {"majority": maj, "minority": mino, "ratio": mino / maj if maj != 0 else float("nan")}


# ----------------------------------------------------------------------------------------------------------
# Training: one run = one method, one ratio, one seed.

def cpu_state(net):
    """A CPU copy of the weights, without torch.compile's `_orig_mod.` prefix."""
    return {k.removeprefix("_orig_mod."): w.detach().cpu().clone() for k, w in net.state_dict().items()}


def train_run(method, ratio, seed, train, evalsets, cfg, device, tag=""):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)              # batch order, MixUp partners and lambdas (CPU)
    x_N, y_N, a_true_N = train                             # x_N (N, 3, 28, 28); a_true only for groupdro/eval
    N, C = len(y_N), 10
    net = mlp(C).to(device)
    net_b = mlp(C).to(device) if method in TWO_NETS else None
    params = list(net.parameters()) + (list(net_b.parameters()) if net_b is not None else [])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    delta_CC = torch.full((C, C), 1.0 / (C * C), device=device)   # uniform start: LC begins as plain CE
    a_mem_N = y_N.clone()                                  # last pseudo-attribute per sample (all "majority")
    ema_b, ema_d = torch.zeros(N, device=device), torch.zeros(N, device=device)   # LfF loss EMAs
    seen_N = torch.zeros(N, dtype=torch.bool, device=device)
    q_G = torch.full((C * C,), 1.0 / (C * C), device=device)      # GroupDRO group weights
    steps = math.ceil(N / cfg.batch_size)
    best = {"val": -1.0}
    hist = []
    t0 = time.time()
    bar = tqdm(range(cfg.epochs), desc=f"{tag}{method:10s} rho={ratio:g}% seed={seed}", leave=False,
               dynamic_ncols=True, disable=None)
    for ep in bar:
        net.train()
        if net_b is not None:
            net_b.train()
        perm = torch.randperm(N, generator=gen).to(device)
        ramp = min(1.0, ep / max(cfg.mix_ramp, 1))          # Group MixUp: no mixing in epoch 1, full after mix_ramp
        mixing = method in ("lc", "mixup_only")
        pools = minority_pools(y_N, a_mem_N, C) if mixing and cfg.mix_pool == "global" else None
        tot = 0.0
        for s in range(steps):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x, y = x_N[idx], y_N[idx]                      # (B, 3, 28, 28), (B,)
            loss_b = 0.0
            if net_b is not None:
                logit_b = net_b(x)                         # (B, C) biased net on the clean batch
                loss_b = cfg.lambda_b * gce_loss(logit_b, y, cfg.q).mean()
                a_hat = logit_b.detach().argmax(1)         # pseudo-attribute a_x
                a_mem_N[idx] = a_hat
            if method == "erm":
                loss = F.cross_entropy(net(x), y)
            elif method == "groupdro":
                ce = F.cross_entropy(net(x), y, reduction="none")
                g = y * C + a_true_N[idx]                  # ORACLE group labels
                n_g = torch.bincount(g, minlength=C * C).float()
                loss_g = torch.bincount(g, weights=ce.detach(), minlength=C * C) / n_g.clamp_min(1)
                # q_g <- q_g exp(eta * loss_g) for groups in the batch; loss = sum_g q_g * mean_{i in g} ce_i
                q_G = q_G * torch.exp(cfg.dro_eta * loss_g * (n_g > 0))
                q_G = q_G / q_G.sum()
                loss = (q_G[g] / n_g[g] * ce).sum()
            elif method == "lff":
                ce_d = F.cross_entropy(net(x), y, reduction="none")
                ce_b = F.cross_entropy(logit_b.detach(), y, reduction="none")
                # per-sample EMA of both losses (first visit: the loss itself), normalised by the class maximum
                ema_b[idx] = torch.where(seen_N[idx], cfg.lff_ema * ema_b[idx] + (1 - cfg.lff_ema) * ce_b, ce_b)
                ema_d[idx] = torch.where(seen_N[idx], cfg.lff_ema * ema_d[idx] + (1 - cfg.lff_ema) * ce_d.detach(), ce_d.detach())
                seen_N[idx] = True
                mx_b = torch.zeros(C, device=device).scatter_reduce(0, y_N, ema_b, "amax")
                mx_d = torch.zeros(C, device=device).scatter_reduce(0, y_N, ema_d, "amax")
                lb, ld = ema_b[idx] / mx_b[y].clamp_min(1e-8), ema_d[idx] / mx_d[y].clamp_min(1e-8)
                w = lb / (lb + ld + 1e-8)                  # relative difficulty: high where the biased net fails
                loss = (ce_d * w).mean()
            else:                                          # lc, lc_nomix, mixup_only
                delta_CC = update_prior(delta_CC, y, a_hat, cfg.prior_momentum)
                d_i = delta_CC[:, a_hat].T                 # (B, C): Delta[:, a_x] for every sample
                if method == "lc_nomix":
                    loss = lc_loss(net(x), y, d_i, cfg.prior_eps).mean()
                else:
                    if cfg.mix_pool == "batch":            # partners from this batch's pseudo-minority
                        pools_b = [idx[m] for m in minority_pools(y, a_hat, C)]
                        j = pick_partners(y, idx, pools_b, gen, fallback="class")
                    else:                                  # partners from the whole training set
                        j = pick_partners(y, idx, pools, gen)
                    w_min = (0.5 + 0.5 * torch.rand(len(y), generator=gen)).to(device) * ramp
                    lam = 1 - w_min                        # weight of the sample itself; minority gets w_min
                    x_mix, d_mix = group_mixup(x, x_N[j], d_i, delta_CC[:, a_mem_N[j]].T, lam)
                    if method == "lc":
                        loss = lc_loss(net(x_mix), y, d_mix, cfg.prior_eps).mean()
                    else:
                        loss = F.cross_entropy(net(x_mix), y)
            opt.zero_grad(set_to_none=True)
            (loss + loss_b).backward()                     # one backward through both networks
            opt.step()
            tot += float(loss.detach())
        net.eval()
        v = evaluate(net, *evalsets["val"])
        improved, is_last = v["unbiased"] > best["val"], ep + 1 == cfg.epochs
        # the test set is only *read* at the epochs we report: the best-on-validation one and the last one
        t = evaluate(net, *evalsets["test"]) if improved or is_last else None
        hist.append({"epoch": ep + 1, "loss": tot / steps, "val_unbiased": v["unbiased"]})
        if improved:                                       # model selection on the unbiased VALIDATION split
            best = {"val": v["unbiased"], "epoch": ep + 1, "test": t,
                    "state": cpu_state(net)}
        bar.set_postfix(loss=f"{tot / steps:.3f}", val=f"{v['unbiased']:.1f}")
        if cfg.log_every and ((ep + 1) % cfg.log_every == 0 or is_last):
            tqdm.write(f"{tag}{method:10s} rho={ratio:<4g} seed={seed} ep {ep + 1:3d}/{cfg.epochs} loss {tot / steps:.3f} "
                       f"val {v['unbiased']:5.1f} (best val {best['val']:.1f} @ ep {best['epoch']})")
    bar.close()
    last = t
    rec = {"method": method, "ratio": ratio, "seed": seed,
           "unbiased_acc_last": last["unbiased"], "unbiased_acc_best_val": best["test"]["unbiased"],
           "aligned_acc": best["test"]["aligned"], "conflicting_acc": best["test"]["conflicting"],
           "worst_group_acc": best["test"]["worst_group"],
           "aligned_acc_last": last["aligned"], "conflicting_acc_last": last["conflicting"],
           "worst_group_acc_last": last["worst_group"], "best_val_epoch": best["epoch"],
           "val_acc_best": best["val"], "epochs": cfg.epochs, "wall_s": time.time() - t0,
           "margins_train": margin_stats(net, *train), "margins_test": margin_stats(net, *evalsets["test"]),
           "history": hist}
    return rec, {"last": cpu_state(net), "best_val": best["state"]}


# ----------------------------------------------------------------------------------------------------------
# Reporting.

def mean_std(v):
    v = np.asarray(v, dtype=float)
    return v.mean(), (v.std(ddof=1) if len(v) > 1 else 0.0)


def paper_value(table, method, ratio):
    if method in table and ratio in PAPER_RATIOS:
        return f"{table[method][PAPER_RATIOS.index(ratio)]:.2f}"
    return "-"


def summary_table(runs):
    keys = [("unbiased_acc_best_val", "unbiased (best val)"), ("unbiased_acc_last", "unbiased (last)"),
            ("aligned_acc", "aligned"), ("conflicting_acc", "conflicting"), ("worst_group_acc", "worst group")]
    head = f"{'method':10s} {'rho%':>4s} {'n':>2s} " + " ".join(f"{h:>19s}" for _, h in keys) + f" {'paper':>6s} {'DeNetDM':>7s}"
    lines = ["test accuracy %, mean ± std over seeds; aligned/conflicting/worst group at the best-val epoch;",
             "paper = LC paper Table 1, DeNetDM = independent re-run (both real Colored MNIST, unbiased acc)", head,
             "-" * len(head)]
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    for (m, rho), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
        cells = []
        for k, _ in keys:
            mu, sd = mean_std([r[k] for r in rs])
            cells.append(f"{mu:12.2f} ± {sd:4.1f}")
        lines.append(f"{m:10s} {rho:4g} {len(rs):2d} " + " ".join(cells) +
                     f" {paper_value(PAPER, m, rho):>6s} {paper_value(DENETDM, m, rho):>7s}")
    return "\n".join(lines)


def margin_table(runs):
    lines = ["mean margin f_y - max_{y'!=y} f_y' of the last-epoch model, by TRUE group (paper Fig. 4);",
             "ratio = minority / majority (LC should push it up)",
             f"{'method':10s} {'rho%':>4s} " + " ".join(f"{s + ' ' + g:>9s}" for s in ("train", "test") for g in ("maj", "min"))
             .replace("train min", "train min  ratio").replace("test min", "test min  ratio")]
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    for (m, rho), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
        c = [np.mean([r[s][k] for r in rs]) for s in ("margins_train", "margins_test")
             for k in ("majority", "minority", "ratio")]
        lines.append(f"{m:10s} {rho:4g} " + " ".join(f"{v:9.2f}" if i % 3 != 2 else f"{v:6.2f}"
                                                     for i, v in enumerate(c)))
    return "\n".join(lines)


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)                                  # a Ctrl-C never leaves a half-written results.json


# ----------------------------------------------------------------------------------------------------------
# main

class Parser(argparse.ArgumentParser):
    def error(self, message):                              # one-line errors, exit 2 (see main)
        raise UsageError(message)


def parse_list(s, typ, name):
    try:
        vals = [typ(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name}: cannot parse {s!r} as a comma list of {typ.__name__}") from None
    if not vals:
        raise UsageError(f"--{name}: empty list")
    return vals


def parse_config(argv):
    p = Parser(description="Logit Correction (ICLR 2023) vs ERM/LfF/GroupDRO on coloured digits.")
    for k, v in asdict(Config()).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, action="store_true", help=HELP[k])
        else:
            p.add_argument(flag, type=type(v), default=None if k in SWEEP else v, help=f"{HELP[k]} (default {v})")
    args = vars(p.parse_args(argv))
    for k in SWEEP:                                        # --sweep changes the grid's defaults only
        if args[k] is None:
            args[k] = SWEEP[k] if args["sweep"] else getattr(Config, k)
    cfg = Config(**args)
    methods = parse_list(cfg.methods, str, "methods")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"--methods: unknown method {bad[0]!r} (choose from {', '.join(METHODS)})")
    ratios = parse_list(cfg.ratios, float, "ratios")
    for r in ratios:
        if not (0 < r < 100) or not math.isfinite(r):
            raise UsageError(f"--ratios: {r:g} is outside (0, 100) percent")
    seeds = parse_list(cfg.seeds, int, "seeds")
    for k in ("epochs", "batch_size", "n_train", "n_val", "n_test"):
        if getattr(cfg, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1")
    if cfg.mix_pool not in ("batch", "global"):
        raise UsageError(f"--mix-pool: {cfg.mix_pool!r} is not batch or global")
    if cfg.device not in ("auto", "cpu", "cuda", "mps"):
        raise UsageError(f"--device: unknown device {cfg.device!r}")
    return cfg, methods, ratios, seeds


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def run(cfg, methods, ratios, seeds):
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    grey = load_grey(cfg)                                  # raises UsageError on a bad --data-dir: nothing written yet
    dataset = f"idx:{os.path.basename(os.path.normpath(cfg.data_dir))}" if cfg.data_dir else "procedural"
    print(f"data: {dataset}, train {len(grey['train_y'])} / val {len(grey['val_y'])} / test {len(grey['test_y'])} "
          f"images ({time.time() - t0:.1f} s); device {device}, {torch.get_num_threads()} threads")
    evalsets = colour_eval_splits(grey, cfg, device)
    os.makedirs(os.path.join(cfg.out, "ckpt"), exist_ok=True)
    path = os.path.join(cfg.out, "results.json")
    if os.path.exists(path):
        os.remove(path)                                    # a stale file from an earlier invocation is not a result
    config = {**asdict(cfg), "methods": methods, "ratios": ratios, "seeds": seeds, "dataset": dataset,
              "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    res = {"config": config, "runs": [], "complete": False}
    grid = [(rho, s, m) for rho in ratios for s in seeds for m in methods]
    for i, (rho, s, m) in enumerate(grid):
        if i == 0 or grid[i - 1][:2] != (rho, s):
            train = colour_train(grey, rho, s, device)     # same coloured data for every method of (rho, seed)
        rec, states = train_run(m, rho, s, train, evalsets, cfg, device, tag=f"[{i + 1}/{len(grid)}] ")
        rec["dataset"] = dataset
        print(f"[{i + 1}/{len(grid)}] {m:10s} rho={rho:<4g} seed={s}: unbiased test {rec['unbiased_acc_best_val']:.2f} "
              f"(best val, ep {rec['best_val_epoch']}) / {rec['unbiased_acc_last']:.2f} (last), conflicting "
              f"{rec['conflicting_acc']:.2f}, worst group {rec['worst_group_acc']:.2f}  [{rec['wall_s']:.0f} s]")
        torch.save(states, os.path.join(cfg.out, "ckpt", f"{m}_r{rho:g}_s{s}.pt"))
        res["runs"].append(rec)
        res["complete"] = i + 1 == len(grid)
        res["wall_s"] = time.time() - t0
        write_json_atomic(path, res)                       # after every run: an interrupt keeps finished runs
    print()
    print(summary_table(res["runs"]))
    if cfg.margins:
        print()
        print(margin_table(res["runs"]))
    print(f"\nwrote {path} ({len(res['runs'])} runs, {time.time() - t0:.0f} s)")
    return res


def report(cfg):
    try:
        with open(cfg.report) as f:
            res = json.load(f)
        runs = res["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--report {cfg.report}: not a readable results.json ({e})") from None
    print(summary_table(runs))
    if cfg.margins:
        print()
        print(margin_table(runs))
    return res


def main(argv=None):
    try:
        cfg, methods, ratios, seeds = parse_config(argv)
        return report(cfg) if cfg.report else run(cfg, methods, ratios, seeds)
    except UsageError as e:
        print(f"logit_correction.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

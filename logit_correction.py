"""Logit Correction (LC) against spurious correlations, on coloured digits, in one file.

Paper: Liu, Zhang, Sekhar, Wu, Singhal, Fernandez-Granda, "Avoiding spurious correlations via logit
correction", ICLR 2023, arXiv 2212.01433 (official code: github.com/shengliu66/LC). Baselines: LfF
(Nam et al., "Learning from Failure", NeurIPS 2020) and GroupDRO (Sagawa et al., ICLR 2020).

The story: a digit's colour predicts its label for all but a fraction rho of the training images.
A plain classifier (ERM) learns the colour and fails on a test set where colours are random. LC
trains a second, deliberately biased network whose prediction stands in for the unknown colour
("pseudo-attribute" a_x), estimates the group prior Delta[y, a] = P(y, a), and trains the main
network on corrected logits f(x) + ln Delta[:, a_x]: a rare (y, a) group then needs a large margin,
which is the group-balanced optimum. Group MixUp mixes each sample with a same-class minority sample
to make the rare groups less rare.

Legend (shapes): B = batch, C = 10 classes (= 10 colours / attributes), N = training images,
G = C*C groups (y, a).
Methods (--methods): erm | groupdro (ORACLE: reads the true colour) | lff | lc (LC + Group MixUp,
  the paper's) | lc_nomix (LC alone) | mixup_only (Group MixUp, plain CE). --sweep adds ERM at
  rho = 90 % (colour independent of the digit) as the ceiling row.
Protocol, and where each choice comes from:
  data      55k train / 5k val / 10k test: Colored MNIST's sizes (MNIST's 60k train minus a 5k
            validation split)
  colours   LfF's Colored MNIST: 10 mean colours, N(0, 0.005^2) jitter per image (data/digits.py)
  model     LC's reference MLP (its code, built on DisEnt's): 2352 -> 100 -> 100 -> 16 -> 10,
            ReLU; LfF's 100-100-100 with --mlp lff
  optimiser Adam, batch 256; lr and epochs per method (TUNED), chosen on validation from
            lr {1e-2 (DisEnt's and LC's Colored MNIST setting), 1e-3} x {20, 40} epochs; the
            biased net has its own Adam at lr/10 (LC learner.py: optimizer_b at args.lr*0.1);
            LfF keeps one lr for both nets (LfF, DisEnt code)
  schedule  lr x0.5 every fifth of the epochs: DisEnt's x0.5 every 10k of 50k steps, on 20 or
            40 instead of ~230 epochs (CPU)
  guard     a run whose unbiased validation accuracy falls to <= 12 % (chance: 10 %) after
            epoch 2 is flagged as diverged: in the table, in results.json and on stderr
  GCE       q = 0.7 (LfF, LC); LfF's per-sample loss EMA 0.7 (LfF train.py)
  prior     bias-corrected moving average, momentum 0.995 (LC's default ema_alpha)
  GroupDRO  eta = 0.01 (Sagawa et al.'s robust step size) on group-balanced batches
Examples:
  python logit_correction.py --quick       # ERM vs LC, 5k images, 20 epochs: under a minute
  python logit_correction.py --explain     # ERM vs LC, rho = 1 %, one seed (minutes); LC in numbers
  python logit_correction.py --sweep --out out/lc_sweep      # 5 methods x rho 0.5/1/2/5 x 3 seeds
  python logit_correction.py --report out/lc_sweep/results.json --margins   # tables, no training
--out gets results.json (a rerun skips the runs it holds and adds new ones), metrics.jsonl (a line
per epoch and run), ckpt/ (weights with their config), and acc_vs_conflicting.png and samples.png
when matplotlib is importable.
Measured tables, commands and dates: docs/logit_correction.md.
"""
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import digits
from data.run import (BadInput, check_numbers, check_ranges, curve_png, flag, grid_protocol,
                      log_metrics, main as guarded, mean_std, open_results, parse_choices,
                      parse_flags, parse_list, pick_device, progress, pyplot, report_results,
                      run_grid, save_png, series_of, set_threads, text_table)

METHODS = ("erm", "groupdro", "lff", "lc", "lc_nomix", "mixup_only")
TWO_NETS = ("lff", "lc", "lc_nomix", "mixup_only")     # methods with a GCE-biased auxiliary network
CEILING = 90.0                                         # rho = 90 %: colour independent of digit

# Unbiased test accuracy (%) on Colored MNIST at rho = PAPER_RATIOS: the LC paper's Table 1, and
# DeNetDM's independent 5-seed re-run.
PAPER = {"erm": (35.19, 52.09, 65.86, 82.17), "lff": (52.50, 61.89, 71.03, 80.57),
         "lc": (71.25, 82.25, 86.21, 91.15), "groupdro": (63.12, 68.78, 76.30, 84.20)}
DENETDM = {"erm": (35.34, 50.34, 62.29, 77.63), "lff": (63.39, 74.01, 80.48, 85.39),
           "lc": (63.48, 78.41, 83.63, 88.18)}
PAPER_RATIOS = (0.5, 1.0, 2.0, 5.0)
GROUP_ACCS = ("aligned", "conflicting", "worst_group")   # evaluate()'s accuracies besides unbiased


# --------------------------------------------------------------------------------------------------
# Data: LfF's Colored MNIST. data/digits.py draws (or reads) the grey digits and colours them: a
# training set per (rho, seed) where the colour matches the digit for all but rho % of the images;
# val and test with every colour equally often in every class.

def load_digits(cfg, ratios, device):
    """-> (dataset name, number of training images, {"val", "test": [x, y, a]}, train(rho, seed) ->
    [x (N, 3, 28, 28), y (N,), true colour a (N,)]). Grey digits once (cached in OUT/cache)."""
    try:
        grey = digits.grey_splits(cfg.data_dir, cfg.n_train, cfg.n_val, cfg.n_test, cfg.data_seed,
                                  os.path.join(cfg.out, "cache"))
    except digits.IDXError as e:                           # a bad --data-dir
        raise BadInput(str(e)) from None
    if problem := digits.ratio_problem(grey["train_y"], ratios):  # a class with no conflicting one
        raise BadInput(problem)
    name = "procedural"
    if cfg.data_dir:
        name = f"idx:{os.path.basename(os.path.normpath(cfg.data_dir))}"
    on = lambda arrays: [torch.from_numpy(v).to(device) for v in arrays]
    evalsets = {k: on(v) for k, v in digits.coloured_eval(grey, cfg.data_seed).items()}
    train = lru_cache(1)(lambda rho, seed: on(digits.coloured_train(grey, rho, seed)))  # one kept
    return name, len(grey["train_y"]), evalsets, train


# --------------------------------------------------------------------------------------------------
# Model: an MLP on the 3 x 28 x 28 image, ReLU after every hidden layer, then a linear classifier.
# The default is LC's reference MLP (its code, built on DisEnt's: 16 features before the
# classifier), LfF's is --mlp lff. No torch.compile or bf16 autocast: the network is tiny and fp32
# keeps CPU runs bit-reproducible.

MLPS = {"lc": (100, 100, 16),      # LC / DisEnt: 2352 -> 100 -> 100 -> 16 -> 10 (~247k parameters)
        "lff": (100, 100, 100)}    # LfF mlp.py:  2352 -> 100 -> 100 -> 100 -> 10 (~256k parameters)


def mlp(hidden=MLPS["lc"], C=10):
    layers, d = [nn.Flatten()], 3 * 28 * 28
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, C))


# --------------------------------------------------------------------------------------------------
# The paper's pieces. Losses return per-sample values (B,).

def gce_loss(logits_BC, y_B, q=0.7):
    """Generalized cross-entropy (Zhang & Sabuncu 2018): GCE = (1 - p_y^q) / q. Its gradient is
    p_y^q * grad CE: confidently-classified (easy, here: colour-aligned) samples dominate, which
    makes the net *biased*."""
    p_y = F.softmax(logits_BC, 1).gather(1, y_B[:, None]).squeeze(1)     # (B,)
    return (1 - p_y.clamp_min(1e-12) ** q) / q


def corrected_logits(logits_BC, delta_BC, eps=1e-4):
    """f(x) + ln Delta[:, a_x]: delta_BC[b] is the prior column Delta[:, a_b] (mixed, for Group
    MixUp)."""
    return logits_BC + torch.log(delta_BC.clamp_min(eps))


def lc_loss(logits_BC, y_B, delta_BC, eps=1e-4):
    """L_LC = CE(f(x) + ln Delta[:, a_x], y). Train with corrected logits, *predict with raw
    logits*: argmax_y f_y(x) is then the group-balanced rule argmax_y [p(y|x) / P(y, a_x)] (paper
    Sec. 3). Delta[y, a] may be P(y, a) or P(y | a): they differ by ln P(a), the same for every y,
    which softmax ignores."""
    return F.cross_entropy(corrected_logits(logits_BC, delta_BC, eps), y_B, reduction="none")


def update_prior(num_CC, den, y_B, a_B, beta):
    """Group prior Delta = num / den, a bias-corrected moving average of the batch counts of
    (y, a_x):
        num <- beta num + counts_B(y, a),   den <- beta den + B.
    With equal batches this is Adam's m_t / (1 - beta^t); a partial batch counts by its size; and
    from step 1 on Delta is a frequency (a uniform starting Delta with momentum 0.99 reached its
    final rare-cell margins only around epoch 17). Returns (num, den)."""
    C = num_CC.shape[0]
    counts = torch.bincount(y_B * C + a_B, minlength=C * C).view(C, C).float()
    return beta * num_CC + counts, beta * den + len(y_B)


def minority_pools(y_N, a_N, C=10):
    """Per class k, the indices whose pseudo-attribute is not k (the pseudo-minority of class k)."""
    return [((y_N == k) & (a_N != k)).nonzero().squeeze(1) for k in range(C)]


def pick_partners(y_B, idx_B, pools, gen, fallback="self"):
    """Group MixUp partners: for each sample of class k a uniformly random member of pools[k]. A
    class with no minority sample pairs each sample with itself (fallback="self", a no-op mix) or
    with a random same-class sample of the batch (fallback="class", plain within-class MixUp, as
    the official code does)."""
    part = idx_B.clone()
    for k, pool in enumerate(pools):
        rows = (y_B == k).nonzero().squeeze(1)
        if len(rows) and len(pool):
            part[rows] = pool[torch.randint(len(pool), (len(rows),), generator=gen).to(pool.device)]
        elif len(rows) and fallback == "class":
            part[rows] = idx_B[rows][torch.randperm(len(rows), generator=gen).to(rows.device)]
    return part


def group_mixup(x_i, x_j, delta_i, delta_j, lam_B):
    """x' = lam x_i + (1 - lam) x_j and Delta' = lam Delta_i + (1 - lam) Delta_j with the SAME lam
    per sample."""
    lx = lam_B.view(-1, *([1] * (x_i.dim() - 1)))
    return lx * x_i + (1 - lx) * x_j, lam_B[:, None] * delta_i + (1 - lam_B[:, None]) * delta_j


def lff_weights(S, idx, y, ce_b, ce_d):
    """LfF's relative difficulty score w = l_b / (l_b + l_d) (Nam et al.): l_b, l_d are per-sample
    EMAs of the biased and main nets' CE (first visit: the loss itself), each divided by its class
    maximum over the training set. w is near 1 where the biased net fails and the main one does not:
    the bias-conflicting images."""
    for mem, ce in ((S.ema_b, ce_b), (S.ema_d, ce_d)):
        mem[idx] = torch.where(S.seen[idx], S.cfg.lff_ema * mem[idx] + (1 - S.cfg.lff_ema) * ce, ce)
    S.seen[idx] = True
    cmax = lambda mem: (torch.zeros(10, device=mem.device)
                        .scatter_reduce(0, S.y_N, mem, "amax")[y].clamp_min(1e-8))
    lb, ld = S.ema_b[idx] / cmax(S.ema_b), S.ema_d[idx] / cmax(S.ema_d)
    return lb / (lb + ld + 1e-8)


def dro_update(q_G, loss_G, present_G, eta):
    """Online GroupDRO (Sagawa et al. Alg. 1): q_g <- q_g exp(eta * loss_g) for the groups in the
    batch, renormalised."""
    q_G = q_G * torch.exp(eta * loss_G * present_G)
    return q_G / q_G.sum()


def balanced_order(g_N, n, gen):
    """n training indices drawn group-balanced: a group uniformly among the non-empty ones, then an
    image uniformly inside it (with replacement). Every non-empty group is then 1 / #groups of every
    epoch."""
    order = torch.argsort(g_N, stable=True)
    groups, counts = torch.unique_consecutive(g_N[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    gi = torch.randint(len(groups), (n,), generator=gen)
    offs = (torch.rand(n, generator=gen) * counts[gi]).long().clamp_max(counts[gi] - 1)
    return order[starts[gi] + offs]


# --------------------------------------------------------------------------------------------------
# One loss function per method; S holds the run's state (networks, optimisers, per-sample memories).

def biased_step(S, x, y, idx):
    """One GCE step of the biased net on its own optimiser; returns its detached logits and
    a_x = argmax f_b(x)."""
    logit_b = S.net_b(x)                                   # (B, C)
    S.opt_b.zero_grad(set_to_none=True)
    gce_loss(logit_b, y, S.cfg.q).mean().backward()
    S.opt_b.step()
    a = S.a_mem[idx] = logit_b.detach().argmax(1)
    return logit_b.detach(), a


def loss_erm(S, x, y, idx):
    return F.cross_entropy(S.net(x), y)


def loss_groupdro(S, x, y, idx):
    ce = F.cross_entropy(S.net(x), y, reduction="none")
    g = y * 10 + S.a_N[idx]                                # ORACLE: the true colour
    n_G = torch.bincount(g, minlength=100).float()
    loss_G = torch.bincount(g, weights=ce.detach(), minlength=100) / n_G.clamp_min(1)  # 0 if absent
    S.q_G = dro_update(S.q_G, loss_G, n_G > 0, S.cfg.dro_eta)
    return (S.q_G[g] / n_G[g] * ce).sum()                 # = sum_g q_g * mean_{i in g} ce_i


def loss_lff(S, x, y, idx):
    logit_b, _ = biased_step(S, x, y, idx)
    ce_d = F.cross_entropy(S.net(x), y, reduction="none")
    w = lff_weights(S, idx, y, F.cross_entropy(logit_b, y, reduction="none"), ce_d.detach())
    return (w * ce_d).mean()


def loss_lc(S, x, y, idx, mix=True, correct=True):
    _, a = biased_step(S, x, y, idx)                       # pseudo-attributes a_x (B,)
    S.num, S.den = update_prior(S.num, S.den, y, a, S.cfg.prior_momentum)
    delta = S.num / S.den                                  # (C, C) Delta[y, a] ~ P(y, a)
    d_B = delta[:, a].T                                    # (B, C) Delta[:, a_x] per sample
    if mix:                                                # Group MixUp: the net sees mixed inputs
        if S.cfg.mix_pool == "batch":
            pools = [idx[m] for m in minority_pools(y, a)]
            j = pick_partners(y, idx, pools, S.gen, fallback="class")
        else:
            j = pick_partners(y, idx, S.pools, S.gen)
        w_min = (0.5 + 0.5 * torch.rand(len(y), generator=S.gen)).to(x.device) * S.ramp
        x, d_B = group_mixup(x, S.x_N[j], d_B, delta[:, S.a_mem[j]].T, 1 - w_min)
    if not correct:
        d_B = torch.ones_like(d_B)                         # ln 1 = 0: plain cross-entropy
    return lc_loss(S.net(x), y, d_B, S.cfg.prior_eps).mean()


LOSSES = {"erm": loss_erm, "groupdro": loss_groupdro, "lff": loss_lff, "lc": loss_lc,
          "lc_nomix": partial(loss_lc, mix=False), "mixup_only": partial(loss_lc, correct=False)}

# Each method's own optimisation: its best unbiased VALIDATION accuracy over the grid lr {1e-2,
# 1e-3} x epochs {20, 40} (lr x 0.5 every fifth of the epochs) at rho = 1 %, seed 1, default MLP:
# the table "Optimisation chosen on validation" in docs/logit_correction.md; --lr, --epochs win.
TUNED = {"erm": {"lr": 1e-2, "epochs": 40}, "groupdro": {"lr": 1e-2, "epochs": 40},
         "lff": {"lr": 1e-2, "epochs": 40}, "lc": {"lr": 1e-2, "epochs": 20},
         "lc_nomix": {"lr": 1e-2, "epochs": 40},
         "mixup_only": {"lr": 1e-2, "epochs": 20}}         # not in the grid: LC's setting


# --sweep: the paper's grid (Table 1's methods and ratios) over three seeds, plus the ERM ceiling
SWEEP = {"methods": "erm,lff,lc_nomix,lc,groupdro", "ratios": "0.5,1,2,5", "seeds": "1,2,3"}


def method_config(cfg, method):
    """cfg with the method's own lr and epochs where the flags left them at 0, decay resolved."""
    lr, epochs = cfg.lr or TUNED[method]["lr"], cfg.epochs or TUNED[method]["epochs"]
    decay = cfg.decay_every if cfg.decay_every >= 0 else epochs // 5   # 0 = constant (< 5 epochs)
    return replace(cfg, lr=lr, epochs=epochs, decay_every=decay)


# --------------------------------------------------------------------------------------------------
# Evaluation and the mechanism in numbers.

@torch.no_grad()
def predict(net, x, bs=4096):
    return torch.cat([net(x[i:i + bs]) for i in range(0, len(x), bs)])


@torch.no_grad()
def evaluate(net, x, y, a, C=10):
    """Accuracies in %: unbiased = mean over the non-empty (y, a) groups (group-balanced accuracy),
    aligned (a == y), conflicting (a != y), worst group."""
    correct = (predict(net, x).argmax(1) == y).float()
    g = y * C + a
    n_g = torch.bincount(g, minlength=C * C).float()
    acc_g = torch.bincount(g, weights=correct, minlength=C * C) / n_g.clamp_min(1)
    seen, al = n_g > 0, a == y
    return {"unbiased": 100 * acc_g[seen].mean().item(), "aligned": 100 * correct[al].mean().item(),
            "conflicting": 100 * correct[~al].mean().item(),
            "worst_group": 100 * acc_g[seen].min().item()}


def diverged(history, chance=10.0, tol=2.0, warmup=2):
    """The divergence guard: the first epoch after the first `warmup` whose unbiased validation
    accuracy is at most chance + tol (12 % for 10 classes), or None. A collapsed network (one class
    for every input, or noise) sits at chance, 10 %; a slow start is not flagged in the first
    `warmup` epochs."""
    low = [h["epoch"] for h in history if h["epoch"] > warmup and h["val_unbiased"] <= chance + tol]
    return low[0] if low else None


def margins(logits_BC, y_B):
    """Classification margin f_y(x) - max_{y' != y} f_y'(x), (B,)."""
    f_y = logits_BC.gather(1, y_B[:, None]).squeeze(1)
    return f_y - logits_BC.scatter(1, y_B[:, None], float("-inf")).amax(1)


@torch.no_grad()
def margin_stats(net, x, y, a):
    """Mean margin on bias-aligned (majority) and bias-conflicting (minority) samples, by TRUE
    attribute."""
    m = margins(predict(net, x), y)
    maj, mino = m[a == y].mean().item(), m[a != y].mean().item()
    return {"majority": maj, "minority": mino, "ratio": mino / maj if maj != 0 else float("nan")}


def pseudo_quality(a_hat_N, y_N, a_N):
    """How well the biased net finds the conflicting images: flagged = (a_hat != y), truth =
    (a != y)."""
    flag, true = a_hat_N != y_N, a_N != y_N
    hit = (flag & true).sum().item()
    return {"precision": 100 * hit / max(flag.sum().item(), 1),
            "recall": 100 * hit / max(true.sum().item(), 1),
            "colour_acc": 100 * (a_hat_N == a_N).float().mean().item()}


@torch.no_grad()
def explain(S):
    """LC as automatic group re-weighting: for one aligned and one (detected) conflicting training
    image, the raw logits f(x), ln Delta[:, a_x], the corrected logits, and |dL/df| = |softmax -
    onehot| under CE and under LC."""
    y, a_t, a_h = S.y_N, S.a_N, S.a_mem
    first = lambda m: int(m.nonzero()[0, 0])
    detected = (a_t != y) & (a_h == a_t)                   # conflicting, and its colour was found
    i_al, i_co = first((a_t == y) & (a_h == y)), first(detected if detected.any() else a_t != y)
    delta = S.num / S.den
    rows, out = [], {}
    for name, i in (("aligned", i_al), ("conflicting", i_co)):
        f = S.net(S.x_N[i:i + 1])[0]
        ld = torch.log((delta[:, a_h[i]]).clamp_min(S.cfg.prior_eps))
        onehot = F.one_hot(y[i], 10).float()
        g_ce = (F.softmax(f, 0) - onehot).norm().item()
        g_lc = (F.softmax(f + ld, 0) - onehot).norm().item()
        out[name] = {"index": i, "label": int(y[i]), "colour": int(a_t[i]), "pseudo": int(a_h[i]),
                     "logits": f.tolist(), "log_delta": ld.tolist(), "grad_ce": g_ce,
                     "grad_lc": g_lc}
        rows.append((f, ld))
    A, Co = out["aligned"], out["conflicting"]
    ratio = lambda k: Co[k] / max(A[k], 1e-12)
    lines = [f"--explain after epoch 1: aligned image {A['index']} (digit {A['label']}, colour "
             f"{A['colour']}, a_x {A['pseudo']}) | conflicting image {Co['index']} (digit "
             f"{Co['label']}, colour {Co['colour']}, a_x {Co['pseudo']})",
             "class | " + " ".join(f"{h:>7s}" for h in ("f(x)", "ln D", "f+ln D") * 2)]
    lines += [f"{k:5d} | " + " ".join(f"{v:7.2f}" for f, ld in rows
                                      for v in (f[k], ld[k], f[k] + ld[k])) for k in range(10)]
    lines.append(f"|dL/df|  CE: aligned {A['grad_ce']:.3f}, conflicting {Co['grad_ce']:.3f}   "
                 f"LC: aligned {A['grad_lc']:.3f}, conflicting {Co['grad_lc']:.3f}  "
                 f"(conflicting/aligned: CE {ratio('grad_ce'):.1f}x, LC {ratio('grad_lc'):.1f}x)")
    tqdm.write("\n".join(lines))
    return out


# --------------------------------------------------------------------------------------------------
# Training: one run = one method, one ratio, one seed.

def cpu_state(net):
    """A CPU copy of the weights, without torch.compile's `_orig_mod.` prefix."""
    return {k.removeprefix("_orig_mod."): w.detach().cpu().clone()
            for k, w in net.state_dict().items()}


def new_state(method, train, cfg, device, seed):
    torch.manual_seed(seed)
    x_N, y_N, a_N = train
    S = SimpleNamespace(cfg=cfg, x_N=x_N, y_N=y_N, a_N=a_N, gen=torch.Generator().manual_seed(seed),
                        ramp=0.0, pools=None, net=mlp(MLPS[cfg.mlp]).to(device), net_b=None,
                        opt_b=None)
    S.opt = torch.optim.Adam(S.net.parameters(), lr=cfg.lr)
    if method in TWO_NETS:
        S.net_b = mlp(MLPS[cfg.mlp]).to(device)
        lr_b = cfg.lr_b or (cfg.lr if method == "lff" else cfg.lr / 10)
        S.opt_b = torch.optim.Adam(S.net_b.parameters(), lr=lr_b)
    S.scheds = [torch.optim.lr_scheduler.StepLR(o, cfg.decay_every or cfg.epochs + 1, 0.5)
                for o in (S.opt, S.opt_b) if o is not None]
    N = len(y_N)
    S.a_mem = y_N.clone()                                  # latest pseudo-attribute per image
    S.num, S.den = torch.zeros(10, 10, device=device), 0.0     # group prior Delta = num / den
    S.ema_b, S.ema_d = torch.zeros(N, device=device), torch.zeros(N, device=device)
    S.seen = torch.zeros(N, dtype=torch.bool, device=device)
    S.q_G = torch.full((100,), 0.01, device=device)       # GroupDRO weights
    return S


def train_epoch(S, method, ep, device):
    """One pass over the training images (GroupDRO: as many group-balanced draws) -> mean loss."""
    S.net.train()
    S.ramp = min(1.0, ep / max(S.cfg.mix_ramp, 1))        # Group MixUp: no mixing in epoch 1
    if S.cfg.mix_pool == "global":
        S.pools = minority_pools(S.y_N, S.a_mem)
    N, B = len(S.y_N), S.cfg.batch_size
    if method == "groupdro":
        order = balanced_order((S.y_N * 10 + S.a_N).cpu(), math.ceil(N / B) * B, S.gen)
    else:
        order = torch.randperm(N, generator=S.gen)
    tot = 0.0
    for s in range(0, len(order), B):
        idx = order[s:s + B].to(device)
        loss = LOSSES[method](S, S.x_N[idx], S.y_N[idx], idx)
        S.opt.zero_grad(set_to_none=True)
        loss.backward()
        S.opt.step()
        tot += float(loss.detach()) * len(idx) / len(order)
    for sch in S.scheds:
        sch.step()
    S.net.eval()
    return tot


def train_run(method, ratio, seed, train, evalsets, cfg, device, tag="", log=None):
    """cfg: method_config's, the run's own lr and epochs. log: None or log_metrics bound to a
    metrics.jsonl path; it gets one record per epoch. -> (the run's record, its weights)."""
    S = new_state(method, train, cfg, device, seed)
    best, hist, t0, explained = {"val": -1.0}, [], time.time(), None
    steps = math.ceil(len(S.y_N) / cfg.batch_size)        # per epoch
    bar = progress(range(cfg.epochs), f"{tag}{method} rho={ratio:g}% seed={seed}")
    for ep in bar:
        tot = train_epoch(S, method, ep, device)
        if cfg.explain and ep == 0 and method in ("lc", "lc_nomix"):
            explained = explain(S)
        v = evaluate(S.net, *evalsets["val"])
        improved, is_last = v["unbiased"] > best["val"], ep + 1 == cfg.epochs
        t = evaluate(S.net, *evalsets["test"]) if improved or is_last else None  # read if reported
        h = {"epoch": ep + 1, "loss": tot, "val_unbiased": v["unbiased"]}
        if S.net_b is not None:
            h.update(pseudo_quality(S.a_mem, S.y_N, S.a_N))
        hist.append(h)
        if log:
            log(method=method, ratio=ratio, seed=seed, step=(ep + 1) * steps, **h,
                **({"test_unbiased": t["unbiased"]} if t else {}))
        if improved:                                       # model selection on unbiased VALIDATION
            best = {"val": v["unbiased"], "epoch": ep + 1, "test": t, "state": cpu_state(S.net)}
        bar.set_postfix(loss=f"{tot:.3f}", val=f"{v['unbiased']:.1f}")
        if cfg.log_every and ((ep + 1) % cfg.log_every == 0 or is_last):
            pq = (f" | a_x prec {h['precision']:5.1f} rec {h['recall']:5.1f}"
                  if "precision" in h else "")
            tqdm.write(f"{tag}{method:10s} rho={ratio:<4g} seed={seed} ep {ep + 1:3d}/{cfg.epochs} "
                       f"loss {tot:.3f} val {v['unbiased']:5.1f} (best {best['val']:.1f} @ "
                       f"{best['epoch']}){pq}")
    bar.close()
    bt = best["test"]
    rec = {"method": method, "ratio": ratio, "seed": seed,
           "n_conflicting": int((S.a_N != S.y_N).sum()),
           "unbiased_acc_last": t["unbiased"], "unbiased_acc_best_val": bt["unbiased"],
           **{f"{k}_acc": bt[k] for k in GROUP_ACCS}, **{f"{k}_acc_last": t[k] for k in GROUP_ACCS},
           "best_val_epoch": best["epoch"], "val_acc_best": best["val"],
           "epochs": cfg.epochs, "lr": cfg.lr, "decay_every": cfg.decay_every,
           "wall_s": time.time() - t0, "diverged": diverged(hist) is not None,
           "diverged_epoch": diverged(hist), "history": hist, "explain": explained,
           "margins_train": margin_stats(S.net, *train),
           "margins_test": margin_stats(S.net, *evalsets["test"])}
    return rec, {"last": cpu_state(S.net), "best_val": best["state"]}


def run_one(cfg, evalsets, train, device, protocol, key, tag, m, rho, s):
    """One run of the grid (run_grid calls it for each point it does not hold yet): train, print its
    line (a divergence also as a warning on stderr), save its weights with their config -> its
    record."""
    mcfg, log = method_config(cfg, m), partial(log_metrics, os.path.join(cfg.out, "metrics.jsonl"),
                                               protocol=key)
    rec, states = train_run(m, rho, s, train(rho, s), evalsets, mcfg, device, tag=tag, log=log)
    rec["dataset"], at = protocol["dataset"], rec["diverged_epoch"]  # at: None unless diverged
    print(f"{tag}{m:10s} rho={rho:<4g} seed={s}: unbiased test {rec['unbiased_acc_best_val']:.2f} "
          f"(best val, ep {rec['best_val_epoch']}) / {rec['unbiased_acc_last']:.2f} (last), "
          f"conflicting {rec['conflicting_acc']:.2f}  [{rec['wall_s']:.0f} s, lr {mcfg.lr:g}, "
          f"{mcfg.epochs} epochs]" + (f"  DIVERGED (val at chance from epoch {at})" if at else ""))
    if at:
        print(f"logit_correction.py: warning: {m} rho={rho:g} seed={s} diverged: unbiased "
              f"validation accuracy <= 12 % (chance 10 %) at epoch {at}", file=sys.stderr)
    settings = {k: getattr(mcfg, k) for k in ("lr", "epochs", "decay_every")}
    torch.save({"config": {**protocol, "method": m, "ratio": rho, "seed": s, **settings}, **states},
               os.path.join(cfg.out, "ckpt", f"{m}_r{rho:g}_s{s}_{key}.pt"))
    return rec


# ---- Plumbing: tables and figures, runs and results, command line, validation ------------------

# A row per (method, rho): the ceiling first, then by rho. A column: (title, format, cell(runs))
ROW = [("method", "10", lambda rs: rs[0]["method"]),
       ("rho%", ">4", lambda rs: f"{rs[0]['ratio']:g}")]
ROW_ORDER = lambda key: (key != ("erm", CEILING), key[1], METHODS.index(key[0]))
ACCS = {"unbiased_acc_best_val": "unbiased (best val)", "unbiased_acc_last": "unbiased (last)",
        **{f"{k}_acc": k.replace("_", " ") for k in GROUP_ACCS}}


def tables(runs, with_margins):
    """What a run and --report print: accuracies beside the paper's, the count table, and on
    request the mean margins by TRUE group (paper Fig. 4)."""
    avg = lambda f: lambda rs: f"{np.mean([f(r) for r in rs]):.2f}"
    ref = lambda t: lambda rs: (f"{t[rs[0]['method']][PAPER_RATIOS.index(rs[0]['ratio'])]:.2f}"
                                if rs[0]["method"] in t and rs[0]["ratio"] in PAPER_RATIOS else "-")
    n_div = lambda rs: sum(diverged(r["history"]) is not None for r in rs)  # old runs: no field
    cols = ([("n", ">2", lambda rs: str(len(rs)))]
            + [(h, ">19", lambda rs, k=k: mean_std([r[k] for r in rs], ".2f"))
               for k, h in ACCS.items()]
            + [("paper", ">6", ref(PAPER)), ("DeNetDM", ">7", ref(DENETDM)),
               ("best val", ">8", avg(lambda r: r["val_acc_best"])),
               ("diverged", ">8", lambda rs: f"{n_div(rs)}/{len(rs)}")])
    text = [text_table("test accuracy %, mean ± sample std over seeds; aligned/conflicting/worst "
                       "group at the best-val epoch;\npaper = LC paper Table 1, DeNetDM = "
                       "independent re-run (both real Colored MNIST); rho 90 = ceiling;\nbest val"
                       " = mean best unbiased validation accuracy; diverged = runs whose val fell "
                       "to <= 12 % (chance)", runs, ("method", "ratio"), ROW + cols, ROW_ORDER,
                       rule=True), count_table(runs)]
    if with_margins:
        cols = [(k if k == "ratio" else f"{s} {k[:3]}", ">9",
                 avg(lambda r, s=s, k=k: r[f"margins_{s}"][k]))
                for s in ("train", "test") for k in ("majority", "minority", "ratio")]
        text.append(text_table("mean margin f_y - max_{y'!=y} f_y' of the last-epoch model by TRUE "
                               "group (paper Fig. 4); ratio = min/maj", runs, ("method", "ratio"),
                               ROW + cols, ROW_ORDER))
    return "\n\n".join(text)


def count_table(runs):
    """Unbiased accuracy by the NUMBER of conflicting training images (a re-weighting method tracks
    it), and the biased net's last-epoch precision / recall at flagging them."""
    mean = lambda xs, spec=".2f": format(np.mean(xs), spec) if xs else "-"
    lc = lambda rs: [r["history"][-1] for r in rs if r["method"] in ("lc", "lc_nomix")]
    pr = lambda rs: "/".join(mean([h[k] for h in lc(rs)], "5.1f") for k in ("precision", "recall"))
    acc = lambda m: lambda rs: mean([r["unbiased_acc_best_val"] for r in rs if r["method"] == m])
    cols = ([("rho%", ">5", lambda rs: f"{rs[0]['ratio']:g}"),
             ("n_conf", ">6", lambda rs: str(rs[0]["n_conflicting"]))]
            + [(m, ">10", acc(m)) for m in METHODS if any(r["method"] == m for r in runs)]
            + [("a_x P/R", ">11", lambda rs: pr(rs) if lc(rs) else "-")])
    return text_table("unbiased test acc % (best val, mean over seeds) by number of conflicting "
                      "training images;\na_x P/R = the LC biased net's precision / recall at "
                      "flagging them (last epoch)", runs, ("ratio",), cols, order=lambda key: key)


def plot_acc_vs_conflicting(runs, out_dir, plt):
    """count_table as a curve per method (the ceiling row left out)."""
    series = series_of([r for r in runs if r["ratio"] < 50], "method", "n_conflicting",
                       "unbiased_acc_best_val", METHODS)
    return curve_png(plt, os.path.join(out_dir, "acc_vs_conflicting.png"), series, xscale="log",
                     xlabel="conflicting training images", ylabel="unbiased test acc %")


def protocol_of(cfg, dataset):
    """The data, model, optimisation and method flags, the dataset, and TUNED where it decides lr
    or epochs -> (protocol, key): runs that differ only in other flags are the same."""
    tuned = {} if cfg.lr and cfg.epochs else {"tuned": TUNED}
    return grid_protocol(cfg, ("data", "model", "optimisation", "method"), dataset=dataset, **tuned)


def run(cfg, methods, ratios, seeds):
    """--report, or the grid, seed-major (an interrupted sweep has whole seeds): a run that
    results.json holds under this protocol is kept, not redone -> this grid's runs."""
    set_threads(cfg.threads)
    device = pick_device(cfg.device)                       # checked up front, --report included
    if cfg.report:
        return report_results(cfg.report, partial(tables, with_margins=cfg.margins))
    path, res, t0 = open_results(cfg.out, "ckpt")          # before the digits go into OUT/cache
    dataset, n_train, evalsets, train = load_digits(cfg, ratios, device)
    protocol, key = protocol_of(cfg, dataset)
    print(f"data: {dataset}, train {n_train} / val {len(evalsets['val'][1])} / test "
          f"{len(evalsets['test'][1])} images ({time.time() - t0:.1f} s); device {device}, "
          f"{torch.get_num_threads()} threads; protocol {key}")
    grid = [(m, rho, s) for s in seeds for rho in ratios + ([CEILING] if cfg.sweep else [])
            for m in methods if rho != CEILING or m == "erm"]
    res, mine = run_grid(path, res, protocol, grid, ("method", "ratio", "seed"),
                         partial(run_one, cfg, evalsets, train, device, protocol, key),
                         lambda m, rho, s: f"{m} rho={rho:g} seed={s}")
    print("\n" + tables(mine, cfg.margins))
    if plt := pyplot():                                    # matplotlib is optional
        print(f"picture: {plot_acc_vs_conflicting(mine, cfg.out, plt)}")
        (_, rho, s), png = grid[0], os.path.join(cfg.out, "samples.png")   # the first run's images
        x, y, a = (t.cpu().numpy() for t in train(rho, s))
        title = f"training images at rho = {rho:g} % (y = digit, a = colour)"
        print(f"picture: {save_png(plt, digits.samples_figure(x, y, a, title, plt), png)}")
    print(f"\n{path}: {len(res['runs'])} runs in all ({time.time() - t0:.0f} s)")
    return {**res, "runs": mine}


QUICK = {"n_train": 5000, "n_val": 1000, "n_test": 2000, "epochs": 20,  # its own protocol key
         "out": "out/logit_correction_quick"}                              # and its own folder


@dataclass
class Config:
    methods: str = flag("erm,lc", "comma list of " + ", ".join(METHODS))
    ratios: str = flag("1", "comma list of bias-conflicting percentages rho in (0, 100)")
    seeds: str = flag("1", "comma list of integer seeds (one run per method x ratio x seed)")
    quick: bool = flag(False, "a smoke run (under a minute): 5k/1k/2k images, 20 epochs, own --out")
    sweep: bool = flag(False, "%s x rho %s x seeds %s + the ERM ceiling" % tuple(SWEEP.values()))
    data_dir: str = flag("", "MNIST-format IDX folder, or its parent; empty = procedural", "data")
    n_train: int = flag(55000, "procedural training images", "data")
    n_val: int = flag(5000, "validation images (IDX: held out of the 60k training ones)", "data")
    n_test: int = flag(10000, "procedural test images", "data")
    data_seed: int = flag(0, "seed of the grey digits and of the val/test colours", "data")
    mlp: str = flag("lc", "hidden: LC's 100-100-16 or LfF's 100-100-100", "model", tuple(MLPS))
    epochs: int = flag(0, "training epochs per run; 0 = each method's own (TUNED)", "optimisation")
    batch_size: int = flag(256, "minibatch size", "optimisation")
    lr: float = flag(0.0, "main network's Adam lr; 0 = each method's own (TUNED)", "optimisation")
    lr_b: float = flag(0.0, "biased net's Adam lr; 0 = lr/10 for LC, lr for LfF", "optimisation")
    decay_every: int = flag(-1, "epochs per lr halving (0 = never, -1 = a fifth)", "optimisation")
    q: float = flag(0.7, "GCE exponent q in (0, 1]", "method")
    prior_momentum: float = flag(0.995, "momentum of Delta's bias-corrected average", "method")
    prior_eps: float = flag(1e-4, "floor of Delta before the log", "method")
    mix_ramp: int = flag(2, "epochs over which Group MixUp's minority weight ramps up", "method")
    mix_pool: str = flag("batch", "MixUp partners: the batch's pseudo-minority (official code) or "
                         "global", "method", ("batch", "global"))
    lff_ema: float = flag(0.7, "LfF's per-sample loss EMA", "method")
    dro_eta: float = flag(0.01, "GroupDRO step size for the group weights", "method")
    explain: bool = flag(False, "print an LC run's logits, ln Delta, corrected logits and gradient "
                         "size for one aligned and one conflicting image after epoch 1", "output")
    margins: bool = flag(False, "also print the margins by true group (paper Fig. 4)", "output")
    report: str = flag("", "path of a results.json: print its tables, train nothing", "output")
    device: str = flag("auto", "auto = cuda, mps or cpu", "output", ("auto", "cpu", "cuda", "mps"))
    threads: int = flag(0, "torch CPU threads; 0 = torch's default (one per core)", "output")
    log_every: int = flag(5, "epochs between log lines (0 = none)", "output")
    out: str = flag("out/logit_correction", "results.json, metrics.jsonl, ckpt/, PNGs", "output")


def parse_config(argv):
    """argv -> (Config, methods, ratios, seeds); every value range-checked here, before any work."""
    cfg = parse_flags(Config, argv, "logit_correction.py", __doc__,
                      presets=[("sweep", True, SWEEP), ("quick", True, QUICK)],  # flags given win
                      epilog=__doc__[__doc__.index("Examples:"):])
    methods = parse_choices(cfg.methods, METHODS, "methods")
    ratios, seeds = parse_list(cfg.ratios, float, "ratios"), parse_list(cfg.seeds, int, "seeds")
    check_numbers(cfg, ("batch_size", "n_train", "n_val", "n_test", "q", "prior_eps"),
                  ("data_seed", "epochs", "lr", "lr_b", "dro_eta", "mix_ramp", "log_every"))
    check_ranges({**vars(cfg), "ratios": ratios, "seeds": seeds}, ratios="(0, 100)",
                 seeds="[0, inf)", q="(0, 1]", prior_eps="(0, 1)", prior_momentum="[0, 1)",
                 lff_ema="[0, 1)", decay_every="[-1, inf)")
    return cfg, methods, ratios, seeds


def main(argv=None):
    """parse -> validate -> run the grid (or --report) -> tables; bad input: one line, exit 2."""
    return guarded("logit_correction.py", lambda: run(*parse_config(argv)))


if __name__ == "__main__":
    main()

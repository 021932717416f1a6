"""Plumbing shared by the paper files: the transformer block, tokenising and padding, index batches, the
AdamW loop, loading the shapes world with its baselines, exact-match scoring, the frozen-LM cache and bridge
checkpoints of the two multimodal files; and, for all four, the habits a user meets in each of them --
device choice, --threads, progress output, metrics.jsonl, mean ± sample std, the one-line errors and the
CLI. Nothing here is paper-specific, so each piece lives in one place."""

import argparse
import hashlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data.shapes import QUESTION_TYPES, ShapesDataError, baselines, generate, load_world


class BadInput(ValueError):
    """A user error: one line on stderr, exit status 2."""


def encode(vocab, text, bos=True, eos=False):
    ids = [vocab.get(w, vocab["<unk>"]) for w in text.split()]
    return ([vocab["<bos>"]] if bos else []) + ids + ([vocab["<eos>"]] if eos else [])


def pad(seqs, value):
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x_BhLd, pos_L):
    """Rotary embedding at explicit positions pos_L: image tokens keep positions 1..M even when they
    enter late, and text keeps M+1.. even while it runs alone."""
    hd = x_BhLd.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=x_BhLd.device).float() / hd))
    ang = pos_L.float()[:, None] * inv[None]                                   # (L, hd/2)
    x1, x2 = x_BhLd.float().chunk(2, -1)
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).to(x_BhLd.dtype)


class Block(nn.Module):
    """Pre-norm transformer block, causal (LM decoder) or bidirectional (ViT, LM encoder); RoPE when it is
    given positions. FFN width 4D. Per layer and sequence length L: QKV 6LD^2, attention 4L^2D + out-proj
    2LD^2, FFN 16LD^2.
    mix=K > 1: Primer's depthwise causal convolution over the sequence on q, k and v (So et al.
    2021, "Primer", Multi-DConv-Head Attention): z'_i = sum_{k<K} w_k * z_{i-k}, per channel. A key then also
    carries the tokens just before it, so "the word before the one I look for" is one attention hop instead of
    two (docs/multimodal_align.md: what it changed for the shapes LM). Elementwise (6KLD FLOPs), so the FLOP
    counter and the formula leave it out, as they leave out norms and RoPE."""

    def __init__(self, dim, n_head, causal, mix=1):
        super().__init__()
        self.nh, self.causal = n_head, causal
        self.ln1, self.ln2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)
        self.mix_w = None
        if mix > 1:                                            # causal in the sequence even when attention is not
            w = torch.zeros(3 * dim, mix)
            w[:, 0] = 1.0                                      # starts as the plain block
            self.mix_w = nn.Parameter(w)

    def mix(self, z_BLC, prev_L=None, cache=None):
        """z'_i = sum_k w_k * z_(k-th predecessor of i); predecessor = i-1 unless prev_L says otherwise (the
        masked reference: text skips the image slots), none before the start (zero). With a cache, the last
        K-1 rows of z are kept so that decoding one token sees its predecessors."""
        K, n_old = self.mix_w.shape[1], 0
        if cache is not None:
            if "z" in cache:
                n_old = cache["z"].shape[1]
                z_BLC = torch.cat([cache["z"], z_BLC], 1)
            cache["z"] = z_BLC[:, -(K - 1):]
        out = z_BLC * self.mix_w[:, 0]
        if prev_L is None:                                     # predecessor = i - 1: shifted copies
            for k in range(1, K):
                out = out + F.pad(z_BLC, (0, 0, k, 0))[:, :z_BLC.shape[1]] * self.mix_w[:, k]   # also when k >= L
            return out[:, n_old:]
        idx = torch.arange(z_BLC.shape[1], device=z_BLC.device)
        for k in range(1, K):
            idx = torch.where(idx >= 0, prev_L[idx.clamp(min=0)], idx)                 # k-th predecessor
            out = out + (z_BLC[:, idx.clamp(min=0)] * (idx >= 0)[None, :, None]) * self.mix_w[:, k]
        return out[:, n_old:]

    def attn_qkv(self, x_BLD, pos_L, prev_L=None, cache=None):
        B, L, D = x_BLD.shape
        z = self.qkv(self.ln1(x_BLD))
        if self.mix_w is not None:
            z = self.mix(z, prev_L, cache)
        q, k, v = z.view(B, L, 3, self.nh, D // self.nh).permute(2, 0, 3, 1, 4)
        if pos_L is not None:
            q, k = rope(q, pos_L), rope(k, pos_L)
        return q, k, v                                                          # (B, h, L, hd) each

    def finish(self, x_BLD, y_BhLd):
        B, L, D = x_BLD.shape
        x = x_BLD + self.proj(y_BhLd.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def forward(self, x_BLD, pos_L=None, mask_LL=None, cache=None, prev_L=None):
        """cache: None, or a dict that receives this call's (k, v) and, if it holds some, is attended to
        first (decoding). mask_LL: boolean 'may attend' (overrides causal; used by the masked reference),
        prev_L: each position's predecessor for the mix (the masked reference; default i-1)."""
        q, k, v = self.attn_qkv(x_BLD, pos_L, prev_L, cache)
        if cache is not None and "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        if mask_LL is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL)
        else:  # decoding one token with a cache: it may see everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and q.shape[2] == k.shape[2])
        return self.finish(x_BLD, y)


class Attention(nn.Module):
    """Multi-head attention; kv_BMC (cross-attention) may have another width than x. RoPE when pos_L is given."""

    def __init__(self, dim, n_head, kv_dim=None):
        super().__init__()
        self.nh = n_head
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BLD, kv_BMC=None, mask=None, causal=False, pos_L=None):
        """mask: boolean 'may attend', broadcastable to (B, h, L, M)."""
        B, L, D = x_BLD.shape
        kv = x_BLD if kv_BMC is None else kv_BMC
        q = self.q(x_BLD).view(B, L, self.nh, -1).transpose(1, 2)
        k, v = self.kv(kv).view(B, kv.shape[1], 2, self.nh, -1).permute(2, 0, 3, 1, 4)
        if pos_L is not None:
            q, k = rope(q, pos_L), rope(k, pos_L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class FFN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln, self.fc1, self.fc2 = RMSNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


def autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def train_loop(params, loss_fn, steps, cfg, desc, device, lr=None, metrics=None):
    """AdamW with linear warm-up (5%) and cosine decay to 10%; loss_fn(step) -> scalar loss. lr: cfg.lr if None.
    metrics: a metrics.jsonl path that gets {run, step, loss, lr} every 50 steps. Returns the last loss (None
    for 0 steps: the flags that set steps allow 0, e.g. to skip a stage)."""
    if steps == 0:
        return None
    peak = cfg.lr if lr is None else lr
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.01)
    warm = max(1, steps // 20)
    bar = progress(range(steps), desc, quiet=steps < 20)
    for step in bar:
        now = peak * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = now
        with autocast(cfg, device):
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if metrics:
                log_metrics(metrics, run=desc, step=step + 1, loss=round(loss.item(), 5), lr=now)
    return loss.item()


LAYER_CODE = (RMSNorm, rope, Block, Attention, FFN, autocast, train_loop)   # what every frozen backbone is built of


def best_of_rounds_ms(fns, device, rounds=15):
    """Wall time (ms) of each fn(round) in {name: fn}: one warm-up call each, then `rounds` round-robin rounds, so
    that a busy spell of the machine hits every fn alike; the minimum shows the undisturbed time."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for f in fns.values():
        f(0)
    ts = {k: [] for k in fns}
    for r in range(rounds):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f(r)
            sync()
            ts[k].append(time.perf_counter() - t)
    return {k: min(v) * 1e3 for k, v in ts.items()}


def step_memory_mib(step_fn, params, device):
    """Training memory of one step (MiB). CUDA: max allocated. CPU (no allocator statistics there): an
    estimate = every storage autograd saves for the backward pass (counted once, via saved_tensors_hooks)
    + 3x the trainable parameters (their gradients and two AdamW moments). Comparable between variants."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_fn()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    seen = {}

    def keep(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        step_fn()
    return (sum(seen.values()) + 3 * sum(p.numel() * p.element_size() for p in params)) / 2 ** 20


def batches(n, bs, seed):
    """Deterministic stream of index batches over n items."""
    if n < bs:
        raise ValueError(f"batches: {n} items cannot fill a batch of {bs}")
    g = np.random.default_rng(seed)
    while True:
        perm = g.permutation(n)
        for i in range(0, n - bs + 1, bs):
            yield perm[i:i + bs]


@torch.no_grad()
def exact_match(predict, items, bs):
    """Exact match of one-word answers, overall and per question type (in QUESTION_TYPES order), in chunks of bs
    items: (scene index, prompt, answer id, type); predict(chunk of items) -> predicted ids (B,)."""
    hit = {}
    for i in range(0, len(items), bs):
        chunk = items[i:i + bs]
        for (_, _, a, t), p in zip(chunk, predict(chunk).tolist()):
            hit.setdefault(t, []).append(p == a)
    order = {t: k for k, t in enumerate(QUESTION_TYPES)}
    per_type = {t: float(np.mean(hit[t])) for t in sorted(hit, key=lambda t: order.get(t, len(order)))}
    return float(np.mean([x for v in hit.values() for x in v])), per_type


def pick_device(name):
    """--device auto | cpu | cuda | mps -> a torch.device; a BadInput (checked before any work) when the asked
    one is not on this machine."""
    mps = getattr(torch.backends, "mps", None)
    mps = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise BadInput(f"--device: expected auto, cpu, cuda or mps, got {name!r}")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not mps):
        raise BadInput(f"--device {name}: {name.upper()} is not available on this machine")
    return torch.device(name)


def set_threads(n):
    """--threads, one meaning in every file: torch's CPU threads in this process; 0 keeps torch's default
    (one per physical core). Thread count can change float summation order, so docs name the count they used."""
    if n < 0:
        raise BadInput(f"--threads must be >= 0 (0 = torch's default), got {n}")
    if n:
        torch.set_num_threads(n)


class progress:
    """A tqdm bar when stderr is a terminal; into a pipe or a log file (where a bar's carriage returns pile
    up) one plain line every ~10 % instead. Iterate over it like tqdm; set_postfix(**kw) shows the latest
    numbers in both forms. quiet: nothing at all (short loops, ranks other than 0)."""

    def __init__(self, iterable, desc, total=None, initial=0, quiet=False, lines=10):
        self.total = len(iterable) + initial if total is None else total
        self.tty, self.quiet, self.desc, self.initial, self.post = sys.stderr.isatty(), quiet, desc, initial, {}
        self.every = max(1, -(-(self.total - initial) // lines))
        self.bar = tqdm(iterable, desc=desc, total=self.total, initial=initial, leave=False, dynamic_ncols=True,
                        disable=quiet or not self.tty)

    def __iter__(self):
        t0 = time.perf_counter()
        for i, x in enumerate(self.bar, self.initial + 1):
            yield x                                        # the loop body runs here; then its line, if due
            if not (self.tty or self.quiet) and ((i - self.initial) % self.every == 0 or i == self.total):
                post = "".join(f" {k}={v}" for k, v in self.post.items())
                print(f"{self.desc}: {i}/{self.total} {time.perf_counter() - t0:.0f}s{post}", file=sys.stderr,
                      flush=True)

    def set_postfix(self, **kw):
        self.post = kw
        self.bar.set_postfix(**kw)

    def close(self):
        self.bar.close()


def log_metrics(path, **record):
    """metrics.jsonl: one JSON record per line, appended and flushed as training goes (a rerun adds lines,
    an interrupted run keeps what it logged)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def hash_str(s):
    """A stable (process-independent) string hash for cache file names."""
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return h


def check_numbers(cfg, positive, at_least_0=()):
    """Each named Config field must be positive (at_least_0: >= 0, where 0 skips that training) and finite; the
    first that is not is a BadInput, fields in the order given (at_least_0 first)."""
    for f in at_least_0 + positive:
        v = getattr(cfg, f)
        if not (v >= 0 if f in at_least_0 else v > 0) or v == math.inf:     # "not": a NaN fails too
            need = (">= 0" if f in at_least_0 else "positive") + (" and finite" if v == math.inf else "")
            raise BadInput(f"--{f.replace('_', '-')} must be {need}, got {v}")


def validate_image_and_run(cfg, encoder_batch):
    """Checks shared by the multimodal paper files (data size, image, dtype, data, seeds), then --threads,
    --device and the output folders, all before any work -> the list of seeds. encoder_batch: the shared
    ViT's pretraining batch, which --n-train must fill too."""
    if not cfg.data_dir and cfg.n_train < max(cfg.batch_size, encoder_batch):
        raise BadInput(f"--n-train {cfg.n_train} must fill a batch (--batch-size, and the encoder's {encoder_batch})")
    if cfg.image_size < 12:
        raise BadInput(f"--image-size must be at least 12, got {cfg.image_size}")
    if cfg.image_size % cfg.patch:
        raise BadInput(f"--image-size {cfg.image_size} must be a multiple of --patch {cfg.patch}")
    m = int(round(math.sqrt(cfg.image_tokens)))
    if m * m != cfg.image_tokens or m > cfg.image_size // cfg.patch:
        raise BadInput(f"--image-tokens must be a square number <= the patch grid ({(cfg.image_size // cfg.patch) ** 2})")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise BadInput(f"--dtype: expected float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.data_dir and not os.path.isdir(cfg.data_dir):
        raise BadInput(f"--data-dir {cfg.data_dir}: no such directory")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise BadInput(f"--seeds must be comma-separated integers, got {cfg.seeds!r}")
    set_threads(cfg.threads)
    pick_device(cfg.device)
    writable_dirs(out=cfg.out, cache_dir=cfg.cache_dir)
    return seeds


def build_key(*code):
    """What decides how a frozen backbone comes out besides its config: the source of the functions, classes or
    modules that build and train it, and the CPU thread count (float summation order: the same recipe can land
    on either side of a plateau with 1 or 2 threads). Part of every backbone cache key, so that a backbone built
    by other code or with other threads is trained anew, never reused silently."""
    src = "".join(inspect.getsource(c) for c in code)
    return f"code={hashlib.sha1(src.encode()).hexdigest()[:12]}_threads={torch.get_num_threads()}"


def cached_lm(world, vocab, cfg, keys, name, make, train, device, code=()):
    """A frozen LM: loaded from cfg.cache_dir when one with this config (`keys` of cfg), vocabulary, corpus and
    build (build_key of `code`, plus the shared layers and training loop) exists, else train() and saved there.
    The corpus is the --data-dir train split, or stands for the procedural generator (its first 50 captions).
    make() -> a fresh module to load into."""
    corpus = json.dumps(vocab) + ("\n".join(world["train"]["captions"]) + json.dumps(world["train"]["qa"])
                                  if cfg.data_dir else "".join(generate(50, "train", seed=7, images=False)["captions"]))
    build = build_key(*code, *LAYER_CODE)
    tag = hashlib.sha1((corpus + str([getattr(cfg, k) for k in keys]) + build).encode()).hexdigest()[:16]
    path = os.path.join(cfg.cache_dir, f"{name}_{tag}.pt")
    if os.path.exists(path):
        lm = make().to(device)
        ck = torch.load(path, map_location=device, weights_only=True)
        lm.load_state_dict(ck["model"] if "config" in ck else ck)   # caches from before the config was stored: bare
        print(f"frozen LM: loaded {path}")
        return lm.eval()
    t = time.perf_counter()
    lm = train()
    torch.save(dict(model=lm.state_dict(), config={k: getattr(cfg, k) for k in keys}, vocab=vocab, build=build),
               path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"frozen LM: pretrained in {time.perf_counter() - t:.0f}s, saved {path}")
    return lm.eval()


def shapes_world(cfg):
    """The data of both multimodal files -> (split -> dataset dict, vocabulary): world v2 or --data-dir
    (data/shapes.py); a data error is a BadInput."""
    try:
        return load_world(cfg.data_dir, cfg.n_train, cfg.n_eval, cfg.image_size, cfg.patch, cfg.batch_size)
    except ShapesDataError as e:
        raise BadInput(str(e))


def shapes_baselines(world, cfg):
    """The data-only baselines on test and hold-out (where there are scenes), their tables fitted on the
    --data-dir train split or on fresh scenes (not the training ones)."""
    ref = world["train"] if cfg.data_dir else generate(min(20_000, 4 * cfg.n_train), "train", seed=1000, images=False)
    return {s: baselines(world[s], ref=ref) for s in ("test", "holdout") if world[s]["captions"]}


class GateFailed(RuntimeError):
    """A frozen backbone failed its gate: the run stops before training bridges on it (exit status 3)."""


def gate_or_stop(cfg, passed, line):
    """Print a backbone's gate line; when it fails, stop the run (GateFailed) unless --ignore-gates (for study)
    or --quick (whose tiny backbones cannot pass: it reports and goes on)."""
    print(line)
    if not passed and not (cfg.ignore_gates or cfg.quick):
        raise GateFailed(f"a frozen backbone failed its gate ({line}); bridges trained on it would measure "
                         f"the backbone, not the method (--ignore-gates trains them anyway, for study)")


def backbone_seed(cfg, seed):
    """The seed of the world's training scenes and the frozen backbones for bridge seed `seed`: the seed itself
    with --vary-backbones, else 0 (then --seeds varies the bridges only)."""
    return seed if cfg.vary_backbones else 0


def text_ceiling_line(ceiling, gate):
    """The frozen LM's gate, {question type: accuracy given the true caption} -> one printable line."""
    return (f"frozen LM text ceiling (true caption as context; gate >= {gate} per type): "
            + ", ".join(f"{t} {v:.3f}" for t, v in ceiling.items())
            + f" -> {'PASS' if min(ceiling.values()) >= gate else 'FAIL'}")


def save_bridge(cfg, tag, model, vocab, **extra):
    """<out>/bridge_<tag>.pt (keep_previous moves these aside on a rerun): the trained weights with the config and
    vocabulary that rebuild them, plain data that torch.load(..., weights_only=True) reads."""
    torch.save(dict(model=model.state_dict(), config=asdict(cfg), vocab=vocab, **extra),
               os.path.join(cfg.out, f"bridge_{tag}.pt"))


def write_json(path, obj):
    """Atomically: a crash mid-write never leaves a truncated file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def write_results(out, res):
    """<out>/results.json, atomically (rewritten after every run, so an interrupted sweep keeps what it had)."""
    write_json(os.path.join(out, "results.json"), res)


def writable_dirs(**dirs):
    """Output folders (flag name -> path), created before any work; a BadInput if one cannot be created or
    written to, so a run never trains for minutes and then fails to save."""
    for name, d in dirs.items():
        flag = "--" + name.replace("_", "-")
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise BadInput(f"{flag} {d}: cannot create it ({e.strerror})")
        if not os.access(d, os.W_OK):
            raise BadInput(f"{flag} {d}: not writable")


def keep_previous(out, also=None):
    """Reruns never silently replace results: an earlier results.json, its checkpoints (bridge_*.pt) and the
    entries `also(name)` picks (a file's run folders, figures) move to previous_<k>/."""
    old = [f for f in os.listdir(out) if f == "results.json" or (f.startswith("bridge_") and f.endswith(".pt"))
           or (also is not None and not f.startswith("previous_") and also(f))]
    if old:
        k = 1 + sum(d.startswith("previous_") for d in os.listdir(out))
        os.makedirs(os.path.join(out, f"previous_{k}"))
        for f in old:
            os.replace(os.path.join(out, f), os.path.join(out, f"previous_{k}", f))
        print(f"earlier results moved to {os.path.join(out, f'previous_{k}')}")


def print_outputs(figure_paths, out, wall_s):
    """The last lines of a run: its figures, then where results.json is and how long the run took."""
    for path in figure_paths:
        print(f"figure: {path}")
    print(f"results: {os.path.join(out, 'results.json')} ({wall_s:.0f} s)")


def linear_probe(x_tr, y_tr, x_te, y_te, ridge=1e-2):
    """A linear read-out fitted in closed form (ridge regression onto one-hot labels, standardised
    features), scored by argmax on held-out rows -> accuracy."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a = torch.cat([(x_tr - mu) / sd, torch.ones(len(x_tr), 1)], 1).double()
    y = F.one_hot(y_tr, int(max(y_tr.max(), y_te.max())) + 1).double()
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    b = torch.cat([(x_te - mu) / sd, torch.ones(len(x_te), 1)], 1).double()
    return float(((b @ w).argmax(1) == y_te).float().mean())


def mean_sd(xs):
    """(mean, sample std with ddof = 1) over seeds; the std is None for a single value. The one convention."""
    xs = [float(x) for x in xs if x is not None]
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None)


def mean_std(xs, spec=".3f"):
    """'mean ± sample std (ddof=1)' over seeds; '-' when there is nothing."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m, sd = mean_sd(xs)
    return format(m, spec) + (f" ± {format(sd, spec)}" if sd is not None else "")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None: matplotlib is optional, and without it the
    paper files print what they always printed and save no PNG. Imported here, on first use, not at start."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(plt, fig, path):
    """Write a figure as a PNG and free it (plt: what pyplot() returned). -> path."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap(mat, rows, cols, title):
    """A terminal heat map: one shade character per cell, values printed to the right."""
    shades = " .:-=+*#%@"
    lo, hi = float(np.min(mat)), float(np.max(mat))
    lines = [title, "      " + "".join(f"{c:>3s}" for c in cols)]
    for r, row in zip(rows, mat):
        cells = "".join(f"  {shades[min(9, int((v - lo) / (hi - lo + 1e-12) * 9.999))]}" for v in row)
        lines.append(f"{r:>5s} {cells}   " + " ".join(f"{v:.3f}" for v in row))
    return "\n".join(lines + [f"      (shade: {lo:.3f} -> {hi:.3f})"])


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors (unknown or abbreviated flag, bad value) as one line and exit status 2, like
    every other input error, instead of the usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


SHARED_HELP = dict(  # the flags both multimodal files share, said once; a file's own `helps` entry wins
    n_train="training scenes (procedural world)",
    data_dir="real data: DIR/images.npy (N,S,S,3) uint8 + DIR/annotations.jsonl (see data/shapes.py)",
    patch="ViT patch size", vit_dim="ViT width C", vit_layers="ViT blocks", vit_steps="ViT pretraining steps",
    lm_scenes="fresh text-only scenes for LM pretraining", lm_lr="LM pretraining learning rate",
    seeds="comma-separated seeds of the bridge runs (the world and frozen backbones use seed 0 unless "
          "--vary-backbones)",
    vary_backbones="each seed also re-draws the world's training scenes and retrains both frozen backbones, so "
                   "mean +- std includes their variance",
    ignore_gates="train bridges even on a backbone that fails its gate (for study; the verdicts then measure the "
                 "backbone)",
    device="auto: CUDA, then MPS, then CPU", dtype="bfloat16: autocast (opt-in)",
    threads="torch's CPU threads (0 = torch's default, one per physical core)",
    quick="a tiny config that prints every section in under a minute",
    out="output folder: results.json, metrics.jsonl, bridge checkpoints (earlier ones move to previous_<k>/), "
        "PNGs (with matplotlib)")
RUN_CHOICES = {"device": ("auto", "cpu", "cuda", "mps"), "dtype": ("float32", "bfloat16")}


def cli(argv, config_cls, helps, doc, run_fn, prog, groups=None, epilog=None, quick=None, choices=None):
    """One --flag per Config field (help from `helps`), then run_fn(cfg); a BadInput is one line on stderr and
    exit status 2. groups: {title: [field, ...]} for --help sections. quick: the defaults that a `quick`
    field (a bool in the Config) switches to; flags given explicitly still win. choices: {field: values} for
    the flags with a fixed set (argparse's `choices`). epilog: by default the docstring's `python ...` example
    lines, so that the examples are written once. Shared by the paper files."""
    examples = [line[2:] for line in doc.splitlines() if line.lstrip().startswith("python ")]
    if epilog is None and examples:
        epilog = "\n".join(["examples:"] + examples)
    ap = OneLineParser(prog=prog, description=doc.split("\n\n")[0], epilog=epilog, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    helps, choices = {**SHARED_HELP, **helps}, {**RUN_CHOICES, **(choices or {})}
    defaults = asdict(config_cls())
    where = {}
    for title, ks in (groups or {}).items():
        g = ap.add_argument_group(title)
        where.update({k: g for k in ks})
    for k, v in defaults.items():
        g, flag = where.get(k, ap), "--" + k.replace("_", "-")
        if isinstance(v, bool):
            g.add_argument(flag, action="store_true", help=helps[k])
        else:
            g.add_argument(flag, type=type(v), default=v, choices=(choices or {}).get(k),
                           help=f"{helps[k]} (default: {v})")
    args = ap.parse_args(argv)
    if quick and getattr(args, "quick", False):
        ap.set_defaults(**quick)
        args = ap.parse_args(argv)
    cfg = config_cls(**vars(args))
    try:
        return run_fn(cfg)
    except BadInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except GateFailed as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        sys.exit(3)

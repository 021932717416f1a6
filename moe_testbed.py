"""MoE Routing Testbed -- does the *scope* of load balancing decide whether experts specialize?

Paper: "MoE Routing Testbed" (Falke et al., Amazon AGI, arXiv 2604.07030, 2026); restated in
../shared/papers/moe_testbed.md. Train a small byte-level MoE transformer on a mix of 8 clearly distinct
"languages" (each training sequence from one), and compare every learned router with a REFERENCE router
that routes each token by its known domain label -- the upper bound on specialization.

    python moe_testbed.py --experts 8            # token-choice top-2, aux loss at global scope (~5 min CPU)
    python moe_testbed.py --sweep                # every router / scope, same seed, data and steps
    python moe_testbed.py --bench                # MoE vs dense step time, side by side in one process
    torchrun --nproc_per_node 2 moe_testbed.py   # data parallel (gloo on CPU, NCCL on GPUs), same global batch
    python moe_testbed.py --preset gpu           # a larger model and batch, bf16 + compile, for one GPU

Other pieces: Switch/GShard aux loss (Fedus et al. 2101.03961, Lepikhin et al. 2006.16668), global-batch
balancing (Qiu et al., Qwen, 2501.11873), aux-loss-free bias balancing (Wang et al. 2408.15664,
DeepSeek-V3 2412.19437), router z-loss (ST-MoE, Zoph et al. 2202.08906), expert choice (Zhou et al.
2202.09368), hash layers (Roller et al. 2106.04426). Expert dispatch: kernels.moe_ffn.

Shape legend (gpt-fast style suffixes):
    B = sequences in a batch      S = sequence length (bytes)     T = B*S tokens, flattened
    D = model dim                 H = expert hidden dim           V = vocabulary (256 bytes)
    E = experts                   K = top-k slots per token       C = tokens per expert (expert choice)
    L = domains                   G = balancing groups (scopes) in a batch
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.domains import DataError, check_lengths, synthetic_domains, text_domains, train_batch, val_windows
from kernels import moe_ffn

# ----------------------------------------------------------------------------------------------------
# Config: every default in one block; each field becomes a --flag (help strings in HELP below)
# ----------------------------------------------------------------------------------------------------


@dataclass
class Config:
    experts: int = 8
    top_k: int = 2
    n_layer: int = 2
    moe_layers: str = "upper"
    d_model: int = 128
    n_head: int = 4
    expert_hidden: int = 128
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 100
    seed: int = 0
    seeds: str = ""
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 1
    compile: bool = False
    impl: str = "grouped"
    router: str = "topk"
    balance: str = "aux"
    balance_scope: str = "global"
    micro_batch: int = 4
    aux_coef: float = 0.01
    z_coef: float = 0.001
    bias_rate: float = 1e-3
    capacity_factor: float = 0.0
    norm_topk: bool = False
    dense: bool = False
    sweep: bool = False
    bench: bool = False
    data_dir: str = ""
    overlap: float = 0.1
    eval_seqs: int = 32
    log_every: int = 100
    ckpt_every: int = 250
    stop_at: int = 0
    out: str = os.path.join("out", "moe_testbed")
    resume: bool = False
    train_bytes: int = 300_000
    preset: str = "cpu"


# --preset: defaults for one kind of machine; flags given on the command line still win
PRESETS = {
    "cpu": {},                                            # the Config defaults above: minutes on a 2-core CPU
    "gpu": dict(d_model=512, n_head=8, n_layer=8, expert_hidden=1024, seq_len=512, batch_size=64, lr=1e-3,
                warmup=200, eval_seqs=64, train_bytes=4_000_000, dtype="bfloat16", compile=True),
}


HELP = {
    "experts": "number of experts E per MoE layer",
    "top_k": "experts per token K (token-choice routers); expert choice takes T*K/E tokens per expert",
    "n_layer": "transformer blocks",
    "moe_layers": "which blocks get an MoE FFN: 'upper' (upper half, default), 'all', or indices like '1,2'",
    "d_model": "model width D",
    "n_head": "attention heads",
    "expert_hidden": "hidden width H of one expert (a dense FFN layer gets K*H: same active parameters)",
    "seq_len": "bytes per training sequence",
    "batch_size": "sequences per optimizer step, over all data-parallel processes (each takes batch-size/world)",
    "steps": "optimizer steps",
    "lr": "peak AdamW learning rate (linear warmup, cosine decay to 10%%)",
    "warmup": "warmup steps",
    "seed": "seed for weights and batch order (the procedural languages themselves are fixed, generated from seed 0)",
    "seeds": "comma-separated seeds, e.g. 1,2,3: repeat every run and report mean +- std",
    "device": "auto (cuda, then mps, else cpu) | cpu | cuda | mps",
    "dtype": "float32 | bfloat16 (bf16 autocast; opt-in)",
    "threads": "CPU threads for torch; 0 = torch's default. 1 (default): the README numbers were measured with it, "
               "and on a 2-core CPU shared with other processes 2 threads ran ~4x slower per step",
    "compile": "torch.compile the blocks and the expert dispatch (opt-in)",
    "impl": "expert dispatch in kernels.moe_ffn: grouped | loop (capacity is chosen by --capacity-factor)",
    "router": "reference (domain-label oracle) | topk (token choice) | expert_choice (not causal) | hash",
    "balance": "topk only: none | aux (Switch/GShard aux loss) | aux_free (DeepSeek-V3 selection bias)",
    "balance_scope": "tokens the balancing is computed over: sequence | micro | global (whole step batch)",
    "micro_batch": "sequences per micro-batch for --balance-scope micro",
    "aux_coef": "aux loss coefficient alpha",
    "z_coef": "router z-loss coefficient (learned routers)",
    "bias_rate": "aux_free bias update rate gamma",
    "capacity_factor": "expert capacity C = ceil(cf*T*K/E) over the batch; over-capacity slots dropped; 0 = dropless",
    "norm_topk": "topk: renormalise the gates over the chosen k (Mixtral/DeepSeek form); default: raw softmax probs",
    "dense": "train the dense baseline (FFN width K*H everywhere) instead of the MoE",
    "sweep": "run the comparison: reference, hash, topk-none, aux seq/micro/global, aux_free micro/global, "
             "expert_choice, aux global cf=1.0",
    "bench": "time MoE vs dense training steps side by side in this process and print the ratio",
    "data_dir": "real text instead of the procedural mix: DIR/<domain>/*.txt (UTF-8), >= 2 domains",
    "overlap": "procedural data: probability a word is a loanword shared by all languages (0..1)",
    "eval_seqs": "held-out sequences per domain for evaluation",
    "log_every": "steps between log lines",
    "ckpt_every": "steps between checkpoints",
    "stop_at": "stop after this step as if interrupted (checkpoint only, no results); for testing --resume",
    "out": "output folder: results.json and one subfolder per run with its checkpoint",
    "resume": "continue each run from its checkpoint in --out (finished runs are reused)",
    "train_bytes": "procedural data: training bytes per domain",
    "preset": "cpu (the defaults) | gpu (d 512, 8 blocks, 64x512 batch, bf16, compile, fused AdamW; needs CUDA)",
}

SWEEP = [  # name, overrides
    ("reference", dict(router="reference", balance="none")),
    ("hash", dict(router="hash", balance="none")),
    ("topk-none", dict(router="topk", balance="none")),
    ("aux-sequence", dict(router="topk", balance="aux", balance_scope="sequence")),
    ("aux-micro", dict(router="topk", balance="aux", balance_scope="micro")),
    ("aux-global", dict(router="topk", balance="aux", balance_scope="global")),
    ("auxfree-micro", dict(router="topk", balance="aux_free", balance_scope="micro")),
    ("auxfree-global", dict(router="topk", balance="aux_free", balance_scope="global")),
    ("expert-choice", dict(router="expert_choice", balance="none")),
    ("aux-global-cf1", dict(router="topk", balance="aux", balance_scope="global", capacity_factor=1.0)),
]


class BadInput(ValueError):
    """A user error: reported as one line, exit status 2."""


def validate(cfg, world=1):
    """Every check that can fail, before any process group exists: all ranks see the same flags and
    WORLD_SIZE, so they all fail alike and exit without waiting for each other."""
    def need(ok, msg):
        if not ok:
            raise BadInput(msg)
    for f in ("experts", "top_k", "n_layer", "d_model", "n_head", "expert_hidden", "seq_len", "batch_size",
              "steps", "micro_batch", "eval_seqs", "log_every", "ckpt_every", "train_bytes"):
        need(getattr(cfg, f) > 0, f"--{f.replace('_', '-')} must be positive, got {getattr(cfg, f)}")
    need(min(cfg.warmup, cfg.stop_at, cfg.threads) >= 0, "--warmup, --stop-at and --threads must be >= 0")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.top_k <= cfg.experts, f"--top-k {cfg.top_k} is larger than --experts {cfg.experts}")
    need(cfg.d_model % cfg.n_head == 0 and (cfg.d_model // cfg.n_head) % 2 == 0,
         f"--d-model {cfg.d_model} must be a multiple of 2*--n-head ({2 * cfg.n_head}) for RoPE")
    need(cfg.router in ("reference", "topk", "expert_choice", "hash"), f"unknown --router {cfg.router!r}")
    need(cfg.balance in ("none", "aux", "aux_free"), f"unknown --balance {cfg.balance!r}")
    need(cfg.balance_scope in ("sequence", "micro", "global"), f"unknown --balance-scope {cfg.balance_scope!r}")
    need(world >= 1 and cfg.batch_size % world == 0,
         f"--batch-size {cfg.batch_size} must be divisible by the number of processes (WORLD_SIZE={world})")
    b = cfg.batch_size // max(world, 1)                    # sequences per process; micro-batches stay in one
    need(cfg.balance_scope != "micro" or b % cfg.micro_batch == 0,
         f"--batch-size {cfg.batch_size}" + (f" / {world} processes" if world > 1 else "")
         + f" must be a multiple of --micro-batch {cfg.micro_batch}")
    need(min(cfg.aux_coef, cfg.z_coef, cfg.bias_rate, cfg.capacity_factor) >= 0,
         "--aux-coef, --z-coef, --bias-rate and --capacity-factor must be >= 0")
    need(cfg.capacity_factor == 0 or cfg.router != "expert_choice",
         "--capacity-factor does not apply to expert_choice (every expert takes exactly T*K/E tokens)")
    need(cfg.router != "expert_choice" or b * cfg.seq_len * cfg.top_k >= cfg.experts,
         "expert_choice needs batch-size/world*seq-len*top-k >= experts")
    need(cfg.dtype in ("float32", "bfloat16"), f"unknown --dtype {cfg.dtype!r}")
    need(cfg.impl in ("grouped", "loop"), f"unknown --impl {cfg.impl!r}")
    need(0.0 <= cfg.overlap <= 1.0, f"--overlap must be in [0, 1], got {cfg.overlap}")
    need(not (cfg.sweep and (cfg.dense or cfg.bench)), "--sweep cannot be combined with --dense or --bench")
    need(world == 1 or not cfg.bench, "--bench times two models in one process: run it without torchrun")
    need(cfg.preset in PRESETS, f"unknown --preset {cfg.preset!r}")
    moe_layer_ids(cfg)
    seed_list(cfg)


def moe_layer_ids(cfg):
    if cfg.moe_layers == "upper":
        return list(range(cfg.n_layer // 2, cfg.n_layer))
    if cfg.moe_layers == "all":
        return list(range(cfg.n_layer))
    try:
        ids = sorted({int(s) for s in cfg.moe_layers.split(",")})
    except ValueError:
        raise BadInput(f"--moe-layers must be 'upper', 'all' or comma-separated indices, got {cfg.moe_layers!r}")
    if not ids or ids[0] < 0 or ids[-1] >= cfg.n_layer:
        raise BadInput(f"--moe-layers {cfg.moe_layers!r}: indices must lie in [0, {cfg.n_layer})")
    return ids


def seed_list(cfg):
    if not cfg.seeds:
        return [cfg.seed]
    try:
        return [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise BadInput(f"--seeds must be comma-separated integers, got {cfg.seeds!r}")


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise BadInput(f"unknown --device {name!r}")
    if name == "cuda" and not torch.cuda.is_available() or \
            name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInput(f"--device {name} is not available on this machine")
    return name


# ----------------------------------------------------------------------------------------------------
# Data parallelism: torchrun starts one process per CPU slot or GPU; every rank runs this whole file
# ----------------------------------------------------------------------------------------------------

def rank_world():
    """(rank, world size); before init_process_group, what torchrun put in the environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def say(msg):
    if rank_world()[0] == 0:                               # rank 0 speaks (and writes files) for all
        tqdm.write(msg)


def setup_distributed(device, world):
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    gloo on CPU, NCCL on CUDA with one GPU per process. Returns this rank's device."""
    if world == 1:
        return device
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise BadInput(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun")
    backend = {"cpu": "gloo", "cuda": "nccl"}.get(device)
    if backend is None:
        raise BadInput(f"data parallelism runs on cpu (gloo) or cuda (nccl), not on {device}")
    if not (dist.is_available() and getattr(dist, f"is_{backend}_available")()):
        raise BadInput(f"torch.distributed backend {backend} is not available in this torch build")
    if device == "cuda":
        local, n_gpu = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= n_gpu:
            raise BadInput(f"LOCAL_RANK {local} but {n_gpu} GPU(s): at most one process per GPU")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return device


def shutdown_distributed(clean):
    """Leave the process group together. Ranks > 0 finish first (rank 0 alone evaluates, checkpoints and writes);
    one that destroyed the group and exited while rank 0 still used it made torch 2.11's gloo abort a rank
    ("terminate called without an active exception"). So on a clean exit every rank meets at a barrier first.
    After an error that only some ranks saw, no barrier (the others may never arrive): destroy and exit, and
    torchrun stops the remaining ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Data (generators and readers live in data/domains.py)
# ----------------------------------------------------------------------------------------------------

def load_domains(cfg):
    if cfg.data_dir:                                       # only rank 0 writes the cache; the others re-read the text
        cache = os.path.join(cfg.out, "data_cache") if rank_world()[0] == 0 else None
        doms = text_domains(cfg.data_dir, cache_dir=cache)
    else:                                                  # the languages are fixed; --seed varies training
        doms = synthetic_domains(seed=0, overlap=cfg.overlap, train_bytes=cfg.train_bytes)
    check_lengths(doms, cfg.seq_len)
    return doms


def reference_groups(L, E):
    """Domain d -> its fixed group of experts: E//L consecutive experts when E >= L (leftover experts unused),
    else the single expert d*E//L (several domains share one). Returns (L, G) int64."""
    if E >= L:
        G = E // L
        return torch.arange(L * G).view(L, G)
    return (torch.arange(L) * E // L).view(L, 1)


# ----------------------------------------------------------------------------------------------------
# Model: byte-level decoder (RMSNorm, RoPE, causal SDPA), dense or MoE FFN per block
# ----------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def rope_tables(S, hd, device):
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=device).float() / hd))
    ang_SF = torch.arange(S, device=device).float()[:, None] * inv[None]      # F = hd/2
    return ang_SF.cos(), ang_SF.sin()


def apply_rope(x_BNSd, cos_SF, sin_SF):
    x1, x2 = x_BNSd.float().chunk(2, -1)                                      # rotate half (GPT-NeoX form)
    return torch.cat([x1 * cos_SF - x2 * sin_SF, x1 * sin_SF + x2 * cos_SF], -1).to(x_BNSd.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD, cos_SF, sin_SF):
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.nh, D // self.nh).permute(2, 0, 3, 1, 4)   # (B, nh, S, hd)
        q, k = apply_rope(q, cos_SF, sin_SF), apply_rope(k, cos_SF, sin_SF)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False)

    def forward(self, x_BSD, ctx):
        return self.w_out(F.gelu(self.w_in(x_BSD))), None


def all_ranks_sum(t):
    """Sum of a no-grad tensor over the data-parallel ranks (identity in one process). The ONE place
    ranks exchange numbers besides DDP's gradient averaging: global-scope expert counts, aux-free bias
    votes, logged losses."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def aux_loss(probs_BSE, idx_BSK, group_size, coef, reduce=None):
    """Switch/GShard load-balancing loss at a scope of `group_size` sequences:
        L = coef * E * mean_g sum_i f_gi * P_gi
        f_gi = fraction of the top-k slots in group g given to expert i   (counts, no gradient)
        P_gi = mean router probability of expert i over the tokens of g
    group_size 1 = sequence scope, m = micro-batch scope, B (this rank's batch) = global scope. Gradient scale
    does not depend on the scope: d L / d p_ti = coef*E*f_gi / (tokens in g * groups) = coef*E*f_gi / T.
    `reduce` sums the counts over the W ranks (global scope only): f is the share over all T_all tokens, P stays
    local, and DDP averages the ranks' gradients, so each token's gradient is coef*E*f_i / (T*W) = coef*E*f_i /
    T_all -- the same scale; the mean of the ranks' losses is the one-process loss on all T_all tokens."""
    B, S, E = probs_BSE.shape
    G = B // group_size
    counts_GE = F.one_hot(idx_BSK.reshape(G, -1), E).sum(1).float()
    if reduce is not None:
        counts_GE = reduce(counts_GE)
    f_GE = counts_GE / counts_GE.sum(-1, keepdim=True)
    P_GE = probs_BSE.float().reshape(G, group_size * S, E).mean(1)
    return coef * E * (f_GE * P_GE).sum(-1).mean(), counts_GE


@torch.no_grad()
def update_bias(bias_E, counts_GE, rate):
    """Aux-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean load - load_i), load measured over each
    group of the scope (one group = global, its counts already summed over ranks) and the signs averaged over
    the groups of every rank, so the bias stays the same on all ranks and equal to the one-process update."""
    load_GE = counts_GE / counts_GE.sum(-1, keepdim=True)
    votes_E = torch.sign(load_GE.mean(-1, keepdim=True) - load_GE).sum(0)
    tot = all_ranks_sum(torch.cat([votes_E, votes_E.new_tensor([len(load_GE)])]))   # [sum of votes, groups]
    bias_E += rate * tot[:-1] / tot[-1]


def expert_choice_ffn(x_TD, probs_TE, C, w_in_EDH, w_out_EHD):
    """Expert choice: every expert takes its top-C tokens by router probability, so a token gets 0..E
    experts. That has no fixed (T, K) form for kernels.moe_ffn, but its natural form is a fixed [E, C, D]
    buffer: gather, two bmm's, scatter-add. NOT causal: a token's experts depend on the other tokens (and
    future ones) in the batch."""
    gate_EC, tok_EC = probs_TE.t().topk(C, dim=1)
    h_ECH = F.gelu(torch.bmm(x_TD[tok_EC], w_in_EDH))
    out_ECD = torch.bmm(h_ECH, w_out_EHD) * gate_EC[..., None].to(x_TD.dtype)
    y_TD = torch.zeros_like(x_TD).index_add(0, tok_EC.reshape(-1), out_ECD.reshape(-1, x_TD.shape[1]))
    return y_TD, tok_EC


class MoEFFN(nn.Module):
    """Router + E GELU experts. forward returns (y_BSD, stats) with the losses and the routing record."""

    def __init__(self, cfg, n_domains):
        super().__init__()
        D, H, E = cfg.d_model, cfg.expert_hidden, cfg.experts
        self.cfg, self.E, self.K = cfg, E, cfg.top_k
        self.router = nn.Linear(D, E, bias=False)
        self.w_in_EDH = nn.Parameter(torch.randn(E, D, H) * 0.02)
        self.w_out_EHD = nn.Parameter(torch.randn(E, H, D) * 0.02 / math.sqrt(2 * cfg.n_layer))
        self.register_buffer("bias_E", torch.zeros(E))                      # aux_free selection bias
        g = torch.Generator().manual_seed(1234)                            # hash: fixed byte -> K distinct experts
        self.register_buffer("hash_VK", torch.stack([torch.randperm(E, generator=g)[:cfg.top_k] for _ in range(256)]))
        self.register_buffer("groups_LG", reference_groups(n_domains, E))
        self.group_size = {"sequence": 1, "micro": cfg.micro_batch}.get(cfg.balance_scope)   # global: the batch

    def forward(self, x_BSD, ctx):
        cfg, E, K = self.cfg, self.E, self.K
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        T = B * S
        gs = self.group_size or B                   # global scope: every sequence this rank holds, one group
        zero = x_TD.new_zeros((), dtype=torch.float32)
        aux = z = zero
        counts_GE = None
        if cfg.router == "hash":
            idx_TK = self.hash_VK[ctx["tok_BS"].reshape(-1)]                   # fixed token id -> experts
            gates_TK = torch.full((T, K), 1.0 / K, device=x_TD.device)
            probs_TE = None
        else:
            logits_TE = self.router(x_TD).float()
            probs_TE = logits_TE.softmax(-1)                                    # p_t = softmax(W h_t)
            z = cfg.z_coef * torch.logsumexp(logits_TE, -1).pow(2).mean()     # ST-MoE z-loss
        if cfg.router == "reference":
            # the token's domain decides its group; inside it, top-k by the gate restricted to the group
            cand_TG = self.groups_LG[ctx["dom_B"].repeat_interleave(S)]
            gate_TG = logits_TE.gather(1, cand_TG).softmax(-1)
            gates_TK, j_TK = gate_TG.topk(min(K, cand_TG.shape[1]), -1)
            idx_TK = cand_TG.gather(1, j_TK)
        elif cfg.router == "topk":
            # selection may use the aux_free bias; the gate is the raw probability, NOT renormalised over
            # the top-k (Switch/GShard/OLMoE form): y_t = sum_{i in topk} p_ti E_i(h_t)
            sel_TE = probs_TE + self.bias_E if cfg.balance == "aux_free" else probs_TE
            idx_TK = sel_TE.topk(K, -1).indices
            gates_TK = probs_TE.gather(1, idx_TK)
            if cfg.norm_topk:
                gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
            if cfg.balance == "aux" and self.training:
                aux, counts_GE = aux_loss(probs_TE.view(B, S, E), idx_TK.view(B, S, K), gs,
                                          cfg.aux_coef, all_ranks_sum if cfg.balance_scope == "global" else None)
            elif cfg.balance == "aux_free" and self.training:
                counts_GE = F.one_hot(idx_TK.view(B // gs, -1), E).sum(1).float()
                if cfg.balance_scope == "global":
                    counts_GE = all_ranks_sum(counts_GE)
        if cfg.router == "expert_choice":
            C = T * K // E
            y_TD, tok_EC = expert_choice_ffn(x_TD, probs_TE, C, self.w_in_EDH, self.w_out_EHD)
            assign_TE = torch.zeros(T, E, device=x_TD.device).index_put_(
                (tok_EC.reshape(-1), torch.arange(E, device=x_TD.device).repeat_interleave(C)),
                torch.ones(E * C, device=x_TD.device))
            chosen = assign_TE.sum(1) > 0
            # top-1 = the chosen expert with the largest probability; an unchosen token: its argmax
            top1_T = torch.where(chosen, (probs_TE * assign_TE).argmax(1), probs_TE.argmax(1))
            n_drop, n_slots = (~chosen).sum(), T            # dropped = tokens with no expert (a tensor: no sync)
        else:
            impl = "capacity" if cfg.capacity_factor > 0 else cfg.impl
            x_in, w_in, w_out = x_TD, self.w_in_EDH, self.w_out_EHD
            dev = x_TD.device.type
            if torch.is_autocast_enabled(dev):    # a custom op is not on autocast's list: cast as for a matmul,
                dt = torch.get_autocast_dtype(dev)  # so the grouped GEMM gets bf16 (its fast path) not fp32
                x_in, w_in, w_out = x_TD.to(dt), w_in.to(dt), w_out.to(dt)
            y_TD, dropped_TK = moe_ffn(x_in, idx_TK, gates_TK, w_in, w_out, impl=impl,
                                       capacity_factor=cfg.capacity_factor, compile=cfg.compile)
            assign_TE = F.one_hot(idx_TK, E).sum(1).float()                    # selections (before any drop)
            top1_T = idx_TK[:, 0]
            n_drop, n_slots = dropped_TK.sum(), dropped_TK.numel()          # read on the host only when logged
        stats = dict(aux=aux, z=z, counts_GE=counts_GE, assign_TE=assign_TE.detach(), top1_T=top1_T.detach(),
                     n_drop=n_drop, n_slots=n_slots)
        return y_TD.view(B, S, D), stats


class Block(nn.Module):
    def __init__(self, cfg, moe, n_domains):
        super().__init__()
        self.ln1, self.ln2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn = MoEFFN(cfg, n_domains) if moe else DenseFFN(cfg.d_model, cfg.top_k * cfg.expert_hidden)

    def forward(self, x, rope, ctx):
        x = x + self.attn(self.ln1(x), *rope)
        y, stats = self.ffn(self.ln2(x), ctx)
        return x + y, stats


class Model(nn.Module):
    def __init__(self, cfg, n_domains):
        super().__init__()
        moe = set() if cfg.dense else set(moe_layer_ids(cfg))
        self.emb = nn.Embedding(256, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i in moe, n_domains) for i in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:                                                 # GPT-2 init, scaled residual outs
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "w_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
        self.hd = cfg.d_model // cfg.n_head

    def forward(self, tok_BS, dom_B):
        rope = rope_tables(tok_BS.shape[1], self.hd, tok_BS.device)
        ctx = dict(tok_BS=tok_BS, dom_B=dom_B)                               # dom_B: only the reference router reads it
        x, layer_stats = self.emb(tok_BS), []
        for blk in self.blocks:
            x, stats = blk(x, rope, ctx)
            if stats is not None:
                layer_stats.append(stats)
        return self.head(self.ln_f(x)), layer_stats


# ----------------------------------------------------------------------------------------------------
# Routing metrics (numpy, on a domain x expert count matrix accumulated over held-out data)
# ----------------------------------------------------------------------------------------------------

def utilization(f_E):
    """U = sum_i min(f_i, 1/E): 1 = perfectly balanced, 1/E = collapse onto one expert."""
    return float(np.minimum(f_E, 1.0 / len(f_E)).sum())


def dead_experts(f_E):
    return int((f_E < 0.1 / len(f_E)).sum())


def purity(top1_LE):
    """Fraction of tokens whose top-1 expert's majority domain is their own: sum_e max_d M[d,e] / N."""
    return float(top1_LE.max(0).sum() / top1_LE.sum())


def nmi(top1_LE):
    """NMI(domain; top-1 expert) = I(D;E) / sqrt(H(D) H(E)); 0 when either is constant."""
    p = top1_LE / top1_LE.sum()
    pd, pe = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pd, pe)[nz])).sum())
    hd, he = [float(-(q[q > 0] * np.log(q[q > 0])).sum()) for q in (pd, pe)]
    return 0.0 if hd <= 0 or he <= 0 else mi / math.sqrt(hd * he)


def hungarian(cost):
    """Minimum-cost perfect matching on a square matrix (Kuhn-Munkres, O(n^3) potentials form).
    Returns perm with perm[row] = column."""
    n = cost.shape[0]
    INF = float("inf")
    u, v, p, way = np.zeros(n + 1), np.zeros(n + 1), np.zeros(n + 1, dtype=int), np.zeros(n + 1, dtype=int)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = np.full(n + 1, INF), np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    perm = np.zeros(n, dtype=int)
    for j in range(1, n + 1):
        perm[p[j] - 1] = j - 1
    return perm


def agreement(assign_LE, groups_LG):
    """Reference agreement: fraction of (token, slot) assignments inside the token's reference group, after
    the best one-to-one relabelling of learned experts onto reference expert slots (a learned router's
    numbering is arbitrary). gain[e, r] = assignments of expert e that would be in-group if e were slot r;
    the relabelling maximising sum_e gain[e, perm[e]] is found exactly by the Hungarian algorithm.
    Returns (agreement, perm)."""
    L, E = assign_LE.shape
    in_group_LR = np.zeros((L, E))
    for d in range(L):
        in_group_LR[d, groups_LG[d]] = 1.0
    gain_ER = assign_LE.T @ in_group_LR
    perm = hungarian(-gain_ER)
    return float(gain_ER[np.arange(E), perm].sum() / assign_LE.sum()), perm


def routing_metrics(assign_LE, top1_LE, n_drop, n_slots, groups_LG):
    f_E = assign_LE.sum(0) / assign_LE.sum()
    agr, perm = agreement(assign_LE, groups_LG)
    return dict(utilization=utilization(f_E), dead_experts=dead_experts(f_E), purity=purity(top1_LE),
                agreement=agr, nmi=nmi(top1_LE), dropped_frac=n_drop / max(n_slots, 1),
                routing_matrix=(assign_LE / np.maximum(assign_LE.sum(1, keepdims=True), 1e-12)).round(4).tolist(),
                expert_order=np.argsort(perm).tolist())


def accumulate(acc, layer_stats, dom_T, L, E):
    """Add one batch's routing record into per-layer domain x expert matrices."""
    for i, st in enumerate(layer_stats):
        a = acc.setdefault(i, dict(assign=np.zeros((L, E)), top1=np.zeros((L, E)), drop=0, slots=0))
        a["assign"] += torch.zeros(L, E).index_add_(0, dom_T, st["assign_TE"].float().cpu()).numpy()
        a["top1"] += torch.zeros(L, E).index_put_((dom_T, st["top1_T"].cpu()), torch.ones(len(dom_T)),
                                                  accumulate=True).numpy()
        a["drop"] += int(st["n_drop"])
        a["slots"] += st["n_slots"]
    return acc


# ----------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------

def lr_at(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def autocast(cfg, device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def make_optimizer(model, cfg, device):
    fused = torch.device(device).type == "cuda"           # one kernel for all parameters (CUDA only)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)


def step_loss(model, cfg, doms, step, device):
    """Forward this rank's share of step `step`'s batch. Every rank draws the same global batch (a function
    of seed and step) and keeps its own contiguous rows, so W ranks see exactly what one process sees.
    `model` may be DDP-wrapped. Returns (ce + aux + z, ce, aux, layer_stats, dom_B)."""
    rank, world = rank_world()
    b = cfg.batch_size // world
    x, y, dom = (torch.from_numpy(np.ascontiguousarray(a[rank * b:(rank + 1) * b])).to(device)
                 for a in train_batch(doms, cfg.batch_size, cfg.seq_len, cfg.seed, step))
    with autocast(cfg, device):
        logits, layer_stats = model(x, dom)
    ce = F.cross_entropy(logits.float().view(-1, 256), y.reshape(-1))
    aux = sum((st["aux"] for st in layer_stats), ce.new_zeros(()))
    z = sum((st["z"] for st in layer_stats), ce.new_zeros(()))
    return ce + aux + z, ce, aux, layer_stats, dom


def wrap_ddp(model, cfg):
    """DistributedDataParallel over the ranks (the plain model in one process). The aux-free bias buffer is
    already equal on all ranks (update_bias averages every rank's votes); the hash router leaves the router
    weight without a gradient, which DDP must be told."""
    return model if rank_world()[1] == 1 else DDP(model, find_unused_parameters=cfg.router == "hash")


def train_step(model, opt, cfg, doms, step, device):
    """One optimizer step; returns the ce and aux losses averaged over ranks (for the log)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, step)
    loss, ce, aux, layer_stats, dom = step_loss(model, cfg, doms, step, device)
    opt.zero_grad(set_to_none=True)
    loss.backward()                                        # DDP: gradients averaged over ranks here
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    raw = getattr(model, "module", model)                  # under DDP the Model sits in .module
    if cfg.balance == "aux_free" and cfg.router == "topk":
        for st, ffn in zip(layer_stats, [b.ffn for b in raw.blocks if isinstance(b.ffn, MoEFFN)]):
            update_bias(ffn.bias_E, st["counts_GE"], cfg.bias_rate)
    ce_aux = all_ranks_sum(torch.stack([ce.detach(), aux.detach()])) / rank_world()[1]
    return ce_aux[0].item(), ce_aux[1].item(), layer_stats, dom.repeat_interleave(cfg.seq_len).cpu()


def state_dict_clean(model):
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}


def save_ckpt(path, model, opt, step, train_s, cfg):
    tmp = path + ".tmp"
    torch.save(dict(model=state_dict_clean(model), opt=opt.state_dict(), step=step, train_s=train_s,
                    rng=torch.get_rng_state(), config=asdict(cfg)), tmp)
    os.replace(tmp, path)


# these may differ between an interrupted run and its resumption; everything else must match
RESUME_FREE = {"threads", "resume", "stop_at", "out", "log_every", "ckpt_every", "sweep", "seeds", "device", "compile", "impl",
               "preset"}


def run_one(cfg, doms, name, device):
    """Train (or resume) one configuration, evaluate it, return its results dict (None if --stop-at).
    Under torchrun every rank trains; rank 0 alone logs, checkpoints, evaluates and writes (others return {})."""
    rank, world = rank_world()
    run_dir = os.path.join(cfg.out, f"{name}-s{cfg.seed}")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    ckpt_path, res_path = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "result.json")
    if cfg.resume and os.path.exists(res_path) and not cfg.stop_at:
        with open(res_path) as f:
            res = json.load(f)
        if res.get("config_key") == config_key(cfg):
            say(f"[{name} seed {cfg.seed}] finished earlier: reusing {res_path}")
            return res
    torch.manual_seed(cfg.seed)                            # same initial weights on every rank
    model = Model(cfg, len(doms.names)).to(device)
    opt = make_optimizer(model, cfg, device)
    start, train_s = 0, 0.0
    if cfg.resume and os.path.exists(ckpt_path):           # every rank loads the same checkpoint
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        old = {**asdict(Config()), **ck["config"]}           # fields added since then: their defaults
        diff = [k for k in asdict(cfg) if k not in RESUME_FREE and old[k] != getattr(cfg, k)]
        if diff:
            raise BadInput(f"--resume: checkpoint {ckpt_path} was made with different settings: {', '.join(diff)}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"].cpu())
        start, train_s = ck["step"], ck["train_s"]
        say(f"[{name} seed {cfg.seed}] resuming at step {start}")
    if cfg.compile:
        for blk in model.blocks:
            blk.attn = torch.compile(blk.attn)
    model.train()
    net = wrap_ddp(model, cfg)
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    n_moe = sum(isinstance(b.ffn, MoEFFN) for b in model.blocks)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=name, leave=False, dynamic_ncols=True,
               disable=rank != 0)
    t_log = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        ce, aux, layer_stats, dom_T = train_step(net, opt, cfg, doms, step, device)
        train_s += time.perf_counter() - t0
        bar.set_postfix(bpb=f"{ce / math.log(2):.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            line = f"[{name}] step {step + 1:5d} | train bpb {ce / math.log(2):.3f} | aux {aux:.4f}"
            if n_moe:                                      # routing of rank 0's share of the batch
                acc = accumulate({}, layer_stats, dom_T, len(doms.names), cfg.experts)
                groups = reference_groups(len(doms.names), cfg.experts).numpy()
                m = [routing_metrics(a["assign"], a["top1"], a["drop"], a["slots"], groups) for a in acc.values()]
                line += (f" | batch U {np.mean([r['utilization'] for r in m]):.3f}"
                         f" purity {np.mean([r['purity'] for r in m]):.3f}")
            tok_s = (step + 1 - start) * cfg.batch_size * cfg.seq_len / max(time.perf_counter() - t_log, 1e-9)
            say(line + f" | {tok_s:,.0f} tok/s")
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == end):
            save_ckpt(ckpt_path, model, opt, step + 1, train_s, cfg)
    bar.close()
    if cfg.stop_at and end < cfg.steps:
        say(f"[{name}] stopped at step {end} (--stop-at); continue with --resume")
        return None
    if rank != 0:
        return {}
    res = evaluate(model, cfg, doms, device)                # the plain Model: no collectives in here
    router = "dense" if cfg.dense else cfg.router
    balance = cfg.balance if router == "topk" else "none"
    res = dict(name=name, router=router, balance=balance,
               scope=cfg.balance_scope if balance != "none" else None,
               capacity_factor=cfg.capacity_factor, seed=cfg.seed, **res,
               tokens_per_s=cfg.steps * cfg.batch_size * cfg.seq_len / max(train_s, 1e-9),
               train_s=round(train_s, 1), world_size=world, config_key=config_key(cfg))
    with open(res_path + ".tmp", "w") as f:
        json.dump(res, f)
    os.replace(res_path + ".tmp", res_path)
    return res


def config_key(cfg):
    return json.dumps({k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}, sort_keys=True)


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, cfg, doms, device):
    """Held-out bits per byte per domain, and routing metrics per MoE layer and averaged over layers."""
    model.eval()
    L, E = len(doms.names), cfg.experts
    vx, vy, vdom = val_windows(doms, cfg.seq_len, cfg.eval_seqs)
    nll_L, n_L, acc = np.zeros(L), np.zeros(L), {}
    bs = cfg.batch_size // rank_world()[1]                 # the batch one forward saw in training (EC/capacity)
    for i in range(0, len(vx), bs):
        x, y, dom = (torch.from_numpy(a[i:i + bs]).to(device) for a in (vx, vy, vdom))
        with autocast(cfg, device):
            logits, layer_stats = model(x, dom)
        nll_BS = F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1), reduction="none").view(y.shape)
        np.add.at(nll_L, dom.cpu().numpy(), nll_BS.sum(1).cpu().numpy())
        np.add.at(n_L, dom.cpu().numpy(), y.shape[1])
        accumulate(acc, layer_stats, dom.repeat_interleave(cfg.seq_len).cpu(), L, E)
    model.train()
    bpb_L = nll_L / n_L / math.log(2)
    out = dict(val_bpb=float(nll_L.sum() / n_L.sum() / math.log(2)),
               per_domain_bpb={n: round(float(b), 4) for n, b in zip(doms.names, bpb_L)})
    keys = ("utilization", "dead_experts", "purity", "agreement", "nmi", "dropped_frac")
    if not acc:
        return dict(out, **{k: None for k in keys}, routing_matrix=None, per_layer=[])
    groups = reference_groups(L, E).numpy()
    per_layer = [routing_metrics(a["assign"], a["top1"], a["drop"], a["slots"], groups) for a in acc.values()]
    for k in keys:
        out[k] = float(np.mean([r[k] for r in per_layer]))
    total = sum(a["assign"] for a in acc.values())
    out["routing_matrix"] = (total / total.sum(1, keepdims=True)).round(4).tolist()
    out["per_layer"] = [dict(layer=li, **r) for li, r in zip(moe_layer_ids(cfg), per_layer)]
    return out


SHADES = " ░▒▓█"


def heat_map(matrix_LE, names, order):
    """Domain x expert share of routing slots; experts reordered by the reference matching (so a
    specialised router shows a diagonal), shading relative to the largest cell."""
    M = np.asarray(matrix_LE)[:, order]
    top = M.max() or 1.0
    lines = ["domain \\ expert  " + "".join(f"{e:>6}" for e in order)]
    for name, row in zip(names, M):
        lines.append(f"{name:>16} " + "".join(f" {SHADES[min(4, int(v / top * 4.999))] * 2}{v * 100:3.0f}" for v in row))
    return "\n".join(lines)


COLS = [("val_bpb", "val bpb", "{:.3f}"), ("utilization", "U", "{:.3f}"), ("dead_experts", "dead", "{:.1f}"),
        ("purity", "purity", "{:.3f}"), ("agreement", "agree", "{:.3f}"), ("nmi", "NMI", "{:.3f}"),
        ("dropped_frac", "dropped", "{:.3f}"), ("tokens_per_s", "tok/s", "{:.0f}")]


def table(runs):
    """One row per configuration; mean +- std over seeds when there are several."""
    names = list(dict.fromkeys(r["name"] for r in runs))
    head = f"{'router':<16}" + "".join(f"{c[1]:>16}" for c in COLS)
    lines = [head, "-" * len(head)]
    for n in names:
        rs = [r for r in runs if r["name"] == n]
        cells = []
        for key, _, fmt in COLS:
            vals = [r[key] for r in rs if r[key] is not None]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(fmt.format(vals[0]))
            else:
                cells.append(fmt.format(np.mean(vals)) + " ± " + fmt.format(np.std(vals)))
        lines.append(f"{n:<16}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Bench: MoE vs dense step time, interleaved in one process
# ----------------------------------------------------------------------------------------------------

def bench(cfg, doms, device, n=20, warm=3):
    models = {}
    for kind in ("moe", "dense"):
        c = Config(**{**asdict(cfg), "dense": kind == "dense"})
        torch.manual_seed(cfg.seed)
        m = Model(c, len(doms.names)).to(device)
        models[kind] = (c, m, torch.optim.AdamW(m.parameters(), lr=cfg.lr))
    times = {"moe": [], "dense": []}
    for i in range(warm + n):                               # alternate, so both see the same machine load
        for kind, (c, m, opt) in models.items():
            t0 = time.perf_counter()
            train_step(m, opt, c, doms, i, device)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warm:
                times[kind].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, (_, m, _) in models.items()}
    return dict(moe_step_s=med["moe"], dense_step_s=med["dense"], ratio=med["moe"] / med["dense"],
                moe_params=params["moe"], dense_params=params["dense"], steps_timed=n)


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):                                # one line from rank 0, exit 2 (not argparse's usage)
        raise BadInput(message)


def parse_args(argv):
    """Flags -> Config: Config defaults, then the --preset's values, then the flags actually given."""
    p = _Parser(prog="moe_testbed.py", description=__doc__.split("\n")[0])
    preset_keys = {k for v in PRESETS.values() for k in v}
    for f in fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=argparse.SUPPRESS, help=HELP[f.name])
        if f.type is bool or f.type == "bool":             # --compile / --no-compile: a preset's switch can be undone
            act = argparse.BooleanOptionalAction if f.name in preset_keys else "store_true"
            p.add_argument(flag, action=act, **kw)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            p.add_argument(flag, type=typ, **{**kw, "help": kw["help"] + f" (default: {f.default})"})
    given = vars(p.parse_args(argv))
    return Config(**{**PRESETS.get(given.get("preset"), {}), **given})


def main(argv=None):
    clean = False                                          # True once every rank is known to exit the same way
    try:
        cfg = parse_args(argv)
        world = int(os.environ.get("WORLD_SIZE", "1"))     # set by torchrun
        validate(cfg, world)
        device = pick_device(cfg.device)
        if cfg.preset == "gpu" and device != "cuda":
            raise BadInput(f"--preset gpu is sized for a CUDA GPU, but the device is {device}; "
                           "use the default --preset cpu")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        doms = load_domains(cfg)
        device = setup_distributed(device, world)          # after every check that can fail alike on all ranks
        out = _main(cfg, doms, device)
        clean = True
        return out
    except (BadInput, DataError) as e:                     # raised alike on every rank (checks, --resume mismatch)
        clean = True
        if rank_world()[0] == 0:
            print(f"moe_testbed.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:                                               # also on Ctrl-C: leave no process group behind
        shutdown_distributed(clean)


def _main(cfg, doms, device):
    t0 = time.time()
    rank, world = rank_world()
    dp = f" | {world} processes ({dist.get_backend()}), {cfg.batch_size // world} sequences each" if world > 1 else ""
    say(f"device {device} | torch {torch.__version__} | {len(doms.names)} domains: {', '.join(doms.names)} | "
        f"{sum(map(len, doms.train)):,} train / {sum(map(len, doms.val)):,} val bytes" + dp)
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    if cfg.bench:
        b = bench(cfg, doms, device)
        say(f"MoE step {b['moe_step_s'] * 1e3:.1f} ms vs dense (same active params) {b['dense_step_s'] * 1e3:.1f} ms"
            f" -> ratio {b['ratio']:.2f} (median of {b['steps_timed']} interleaved steps; params total "
            f"{b['moe_params']:,} vs {b['dense_params']:,})")
        _write_results(cfg, dict(config=asdict(cfg), bench=b))
        return b
    if cfg.sweep:
        plan = [(n, Config(**{**asdict(cfg), **o})) for n, o in SWEEP]
    else:
        plan = [(run_name(cfg), cfg)]
    runs = []
    for s in seed_list(cfg):
        for name, c in plan:
            c = Config(**{**asdict(c), "seed": s})
            if c.router == "expert_choice":
                say(f"[{name}] note: expert choice is NOT causal (a token's experts depend on later tokens)")
            res = run_one(c, doms, name, device)
            if res is None:
                return None
            if not res:                                     # ranks > 0: rank 0 evaluates and reports
                continue
            runs.append(res)
            if res["per_layer"]:
                for lay in res["per_layer"]:
                    say(f"[{name} seed {s}] layer {lay['layer']}: share of routing slots (%)\n"
                        + heat_map(lay["routing_matrix"], doms.names, lay["expert_order"]))
            say(table([res]).split("\n", 2)[2] + f"  ({res['train_s']:.0f} s)")
    if rank != 0:
        return None
    say(f"\n{len(runs)} run(s), {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} bytes, "
        f"wall {time.time() - t0:.0f} s on {device}" + (f" x {world} processes" if world > 1 else ""))
    say(table(runs))
    if len(runs) == 1 and runs[0]["per_domain_bpb"]:
        say("val bpb per domain: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[0]["per_domain_bpb"].items()))
    _write_results(cfg, dict(config=asdict(cfg), world_size=world, runs=runs))
    return runs


def run_name(cfg):
    if cfg.dense:
        return "dense"
    if cfg.router != "topk":
        name = cfg.router.replace("_", "-")
    else:
        name = "topk-none" if cfg.balance == "none" else f"{cfg.balance.replace('_', '')}-{cfg.balance_scope}"
    return name + (f"-cf{cfg.capacity_factor:g}" if cfg.capacity_factor else "")


def _write_results(cfg, obj):                                 # rank 0 only (its callers see to that)
    path = os.path.join(cfg.out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
    say(f"wrote {path}")


if __name__ == "__main__":
    main()

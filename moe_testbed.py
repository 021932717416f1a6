"""MoE Routing Testbed -- does the *scope* of load balancing decide whether experts specialize?

Paper: "MoE Routing Testbed" (Falke et al., Amazon AGI, arXiv 2604.07030, 2026); restated in
../shared/papers/moe_testbed.md. Train a small byte-level MoE transformer on a mix of 8 clearly
distinct "languages" (each training sequence from one), and compare every learned router with a
REFERENCE router that routes each token by its known domain label: the upper bound on
specialization.

    python moe_testbed.py --quick                   # a tiny run: table + heat map, < 1 min CPU
    python moe_testbed.py --quick --sweep balance   # purity vs the sequences balancing spans
    python moe_testbed.py --experts 8 --threads 1   # top-2, aux loss, global scope (~2.5 min CPU)
    python moe_testbed.py --sweep scopes --accum 8  # every router / scope, micro-batches of 4
    python moe_testbed.py --sweep scopes --accum 8 --seeds 0,1,2 --jobs 2
    torchrun --standalone --nproc_per_node 2 moe_testbed.py   # data parallel, same global batch
    python moe_testbed.py --preset gpu              # larger model and batch, bf16 + compile, a GPU

Scopes (docs/moe_testbed.md has the method and the measured results): an optimizer step is --accum
micro-batches on each of W ranks; balancing spans one sequence, one micro-batch (one forward pass),
the whole step (global: all micro-batches on all ranks, exact by a pre-pass) or the step's
micro-batches so far (running: Megatron-core's global_aux_loss). Also: Qwen's global-batch
balancing (2501.11873), Switch/GShard aux loss (2101.03961, 2006.16668), aux-loss-free bias
(DeepSeek-V3, 2408.15664), router z-loss (ST-MoE, 2202.08906), expert choice (2202.09368), hash
layers (2106.04426). Elsewhere: kernels.moe_ffn (the expert dispatch), kernels/cost.py (FLOPs,
--bench), data/routing.py (metrics, probes, reports), data/run.py (flags, torchrun, results). The
paper reads top to bottom; the command line, runs and results come after "Plumbing".

Routing metrics (data/routing.py), per MoE layer on held-out tokens, f_i = expert i's share of the
slots: utilization U = sum_i min(f_i, 1/E), 1 = balanced; MaxVio = E max_i f_i - 1; purity =
share of tokens whose top-1 expert's majority domain is their own; NMI(domain; top-1 expert);
agreement = share whose top-1 expert is in their domain's reference group, after the best
relabelling; domain probe = accuracy of a ridge probe reading the domain from the router's input.

Shape legend (gpt-fast style suffixes):
    B = sequences in a micro-batch  S = sequence length (bytes)   T = B*S tokens, flattened
    D = model dim                   H = expert hidden dim         V = vocabulary (256 bytes)
    E = experts                     K = top-k slots per token     C = tokens per expert (EC)
    L = domains                     G = balancing groups, or experts in a reference group
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data.domains import (DataError, check_lengths, synthetic_domains, text_domains, train_batch,
                          val_windows)
from data.layers import RMSNorm, rope
from data.routing import (add_record, probe_inputs, report, report_run, routing_summary,
                          step_history)
from data.run import (BadInput, all_ranks_sum, autocast, check_numbers, config_key, exit_process,
                      finished_result, flag, keep_previous, log_metrics, main_distributed, need,
                      parse_flags, parse_seeds, pick_device, progress, rank_world, restore,
                      run_each, save_checkpoint, say, set_threads, writable_dirs, write_json,
                      write_results)
from kernels import moe_ffn
from kernels.cost import bench, flops_note, report_bench, run_dispatch


# ---------------- Routers, one function each: expert ids idx_TK (slot 0: the top-1) and gates_TK

def route_topk(probs_TE, bias_E, K):
    """Token choice: p_t = softmax(W h_t); the k experts with the largest p_ti + b_i. The aux-free
    bias b (zero otherwise) only selects; the gate is the raw probability (Switch/GShard/OLMoE
    form): y_t = sum_{i in topk} p_ti E_i(h_t)."""
    idx_TK = (probs_TE + bias_E).topk(K, -1).indices
    return idx_TK, probs_TE.gather(1, idx_TK)


def reference_groups(L, E, K):
    """The reference map. home_LG: domain d -> its G = E//L experts (E >= L; leftover experts
    unused), or the one expert d*E//L that it shares with other domains (E < L). spill_LJ: when K >
    G, J = K-G further fixed experts (the next ones, cyclically), so the reference uses K experts
    like every other router: same compute, and the load stays exactly balanced on a balanced mix."""
    G = max(1, E // L)
    first_L = torch.arange(L) * G if E >= L else torch.arange(L) * E // L
    home_LG = first_L[:, None] + torch.arange(G)
    spill_LJ = (first_L[:, None] + G + torch.arange(max(0, K - G))) % E
    return home_LG, spill_LJ


def route_reference(probs_TE, dom_T, home_LG, spill_LJ, K, uniform):
    """Oracle: a token of domain d fills its slots from d's home group (top by router probability,
    or round-robin when `uniform`), then from d's spill experts. Gates: the router's probabilities,
    as in route_topk (learned), or 1/K each (uniform). Slot 0 is always a home expert."""
    cand_TG, dev = home_LG[dom_T], probs_TE.device
    T, G = cand_TG.shape
    k = min(K, G)
    if uniform:                                     # token t takes home experts t, t+1, ... (mod G)
        j_Tk = (torch.arange(T, device=dev)[:, None] + torch.arange(k, device=dev)) % G
    else:
        j_Tk = probs_TE.gather(1, cand_TG).topk(k, -1).indices
    idx_TK = torch.cat([cand_TG.gather(1, j_Tk), spill_LJ[dom_T]], 1)
    if uniform:
        return idx_TK, torch.full_like(idx_TK, 1.0 / K, dtype=probs_TE.dtype)
    return idx_TK, probs_TE.gather(1, idx_TK)


def route_hash(tok_T, hash_VK):
    """Hash layer: a fixed random byte -> K experts table, gates 1/K. Balanced only if bytes are."""
    idx_TK = hash_VK[tok_T]
    return idx_TK, torch.full(idx_TK.shape, 1.0 / idx_TK.shape[1], device=tok_T.device)


def expert_choice_ffn(x_TD, probs_TE, C, w_in_EDH, w_out_EHD):
    """Expert choice: every expert takes its top-C tokens by router probability, so a token gets
    0..E experts: a fixed [E, C, D] buffer, gather, two bmm's, scatter-add. NOT causal: a token's
    experts depend on the other (and later) tokens of the micro-batch."""
    gate_EC, tok_EC = probs_TE.t().topk(C, dim=1)
    h_ECH = F.gelu(torch.bmm(x_TD[tok_EC], w_in_EDH))
    out_ECD = torch.bmm(h_ECH, w_out_EHD) * gate_EC[..., None].to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add(0, tok_EC.reshape(-1), out_ECD.flatten(0, 1)), tok_EC


# ---------------- Balancing and capacity, each at a scope

def aux_loss(probs_TE, counts_GE, coef):
    """Switch/GShard load-balancing loss over G groups of equal size (the scope's groups in this
    forward):
        L = coef * E * mean_g sum_i f_gi * P_gi
        f_gi = counts_gi / sum_i counts_gi: share of the top-k slots given to expert i (no grad)
        P_gi = mean router probability of expert i over the tokens of group g
    Gradient per token: coef*E*f_gi / T, whatever the scope. At global scope the counts span the
    whole optimizer step (all micro-batches, all ranks) while P stays this forward's: averaged over
    micro-batches (1/accum) and ranks (DDP), the gradient is the one-pass gradient on the step's
    concatenated batch."""
    G, E = counts_GE.shape
    f_GE = counts_GE / counts_GE.sum(-1, keepdim=True)
    P_GE = probs_TE.float().reshape(G, -1, E).mean(1)
    return coef * E * (f_GE * P_GE).sum(-1).mean()


@torch.no_grad()
def update_bias(bias_E, counts_GE, rate):
    """Aux-loss-free balancing (DeepSeek-V3): b_i += gamma * sign(mean load - load_i), load measured
    over each group of the scope (global: one group, counts summed over the step and the ranks),
    signs averaged over the groups of every rank, so the bias stays the same on all ranks and equal
    to the one-process update."""
    load_GE = counts_GE / counts_GE.sum(-1, keepdim=True)
    votes_E = torch.sign(load_GE.mean(-1, keepdim=True) - load_GE).sum(0)
    tot = all_ranks_sum(torch.cat([votes_E, votes_E.new_tensor([len(load_GE)])]))  # [votes, groups]
    bias_E += rate * tot[:-1] / tot[-1]


def capacity_keep(idx_TK, E, C, G, offset_E=None):
    """Token dropping: C slots per expert in each of G equal groups of tokens; an assignment is kept
    if its place in its expert's queue (token order t*K+k, after offset_E earlier assignments of the
    scope) is < C. C = ceil(cf * tokens_in_scope * K / E). A dropped slot leaves the token its
    residual path."""
    T, K = idx_TK.shape
    onehot_GAE = F.one_hot(idx_TK.reshape(G, -1), E)
    pos_GA = ((onehot_GAE.cumsum(1) - 1) * onehot_GAE).sum(-1)           # A = assignments per group
    if offset_E is not None:
        pos_GA = pos_GA + offset_E.long()[idx_TK.reshape(G, -1)]
    return (pos_GA < C).reshape(T, K)


class StepRouting:
    """What the MoE layers share across the micro-batches (and ranks) of one optimizer step:
    counts[layer]: the step's expert selections, (1, E), all ranks, from the routing pre-pass, for
        the global-scope aux loss with accumulation (None: count this forward, summed over ranks);
    carry[layer]: selections in the step's earlier chunks (global-scope capacity queues);
    running[layer]: selections in the step's micro-batches so far, all ranks (scope running);
    index: the optimizer step (training only; --reference-steps reads it).
    Chunks are ordered micro-batch-major: chunk m*W + r is micro-batch m of rank r."""

    def __init__(self, step_tokens, reduce, counts=None, index=None):
        self.step_tokens, self.reduce, self.counts, self.index = step_tokens, reduce, counts, index
        self.carry, self.running = {}, {}

    def global_counts(self, layer, counts_1E):
        return self.reduce(counts_1E) if self.counts is None else self.counts[layer]

    def running_counts(self, layer, counts_1E):
        """Megatron-core's global_aux_loss: this micro-batch's counts (all ranks) added to those of
        the step's earlier micro-batches; reset every step (a new StepRouting). Megatron keeps the
        running MEAN of the counts: the same f, which is normalised. Only the last micro-batch of
        the step sees all of it."""
        self.running[layer] = self.running.get(layer, 0) + self.reduce(counts_1E)
        return self.running[layer]

    def capacity_offset(self, layer, counts_E):
        """Selections of expert i queued before this chunk: earlier micro-batches (all ranks) +
        lower ranks."""
        rank, world = rank_world() if self.reduce is all_ranks_sum else (0, 1)
        rows_WE = counts_E.new_zeros(world, counts_E.shape[0])
        rows_WE[rank] = counts_E
        rows_WE = self.reduce(rows_WE)                                         # every rank's counts
        carry_E = self.carry.get(layer, torch.zeros_like(counts_E))
        self.carry[layer] = carry_E + rows_WE.sum(0)
        return carry_E + rows_WE[:rank].sum(0)


# ---------------- The MoE layer: router (fp32) -> route_* -> capacity -> kernels.moe_ffn; losses

class MoEFFN(nn.Module):
    def __init__(self, cfg, n_domains, layer_id=0):
        super().__init__()
        D, H, E = cfg.d_model, cfg.expert_hidden, cfg.experts
        self.cfg, self.E, self.K, self.layer_id = cfg, E, cfg.top_k, layer_id
        self.router = nn.Linear(D, E, bias=False)
        self.w_in_EDH = nn.Parameter(torch.randn(E, D, H) * 0.02)
        self.w_out_EHD = nn.Parameter(torch.randn(E, H, D) * 0.02 / math.sqrt(2 * cfg.n_layer))
        self.register_buffer("bias_E", torch.zeros(E))                     # aux_free selection bias
        g = torch.Generator().manual_seed(1234)                   # hash: byte -> K distinct experts
        self.register_buffer("hash_VK", torch.stack([torch.randperm(E, generator=g)[:cfg.top_k]
                                                     for _ in range(256)]))
        home_LG, spill_LJ = reference_groups(n_domains, E, cfg.top_k)
        self.register_buffer("home_LG", home_LG)
        self.register_buffer("spill_LJ", spill_LJ)

    def forward(self, x_BSD, ctx):
        cfg, E = self.cfg, self.E
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        step = ctx.get("step") or StepRouting(B * S * rank_world()[1], all_ranks_sum)  # or: 1 pass
        logits_TE = self.router_logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        z = cfg.z_coef * torch.logsumexp(logits_TE, -1).pow(2).mean()         # ST-MoE z-loss
        ent_sum = torch.special.entr(probs_TE.detach()).sum() / math.log(E)  # entropy in [0, 1]
        if cfg.router == "expert_choice":
            return self.expert_choice(x_TD, probs_TE, z, ent_sum, B, S)
        idx_TK, gates_TK = self.route(probs_TE, ctx, S, step)
        if cfg.router == "hash":                           # the router weight is not used
            z, ent_sum = z.detach() * 0, None
        # balancing groups of this forward: one per sequence, or the micro-batch (micro and global)
        G = B if cfg.balance_scope == "sequence" else 1
        counts_GE = F.one_hot(idx_TK.reshape(G, -1), E).sum(1).float()
        aux = z.new_zeros(())
        if (cfg.router == "topk" and cfg.balance == "aux" and self.training
                and torch.is_grad_enabled()):
            scope_GE = counts_GE
            if cfg.balance_scope == "global":
                scope_GE = step.global_counts(self.layer_id, counts_GE)
            elif cfg.balance_scope == "running":
                scope_GE = step.running_counts(self.layer_id, counts_GE)
            aux = aux_loss(probs_TE, scope_GE, cfg.aux_coef)
        keep_TK = self.capacity(idx_TK, B, S, step)
        y_TD = self.dispatch(x_TD, idx_TK, gates_TK * keep_TK.to(gates_TK.dtype))  # dropped: gate 0
        stats = dict(layer=self.layer_id, aux=aux, z=z, counts_GE=counts_GE, ent_sum=ent_sum,
                     assign_TE=F.one_hot(idx_TK, E).sum(1).float(), top1_T=idx_TK[:, 0],
                     n_drop=(~keep_TK).sum(), n_slots=idx_TK.numel())
        return y_TD.view(B, S, D), stats

    def route(self, probs_TE, ctx, S, step):
        cfg = self.cfg
        # --reference-steps N (a diagnostic, it reads the labels): top-k learns from step N on
        labels_first = self.training and step.index is not None and step.index < cfg.reference_steps
        if cfg.router == "topk" and not labels_first:
            idx_TK, gates_TK = route_topk(probs_TE, self.bias_E, self.K)
        elif cfg.router in ("reference", "topk"):
            dom_T = ctx["dom_B"].repeat_interleave(S)
            idx_TK, gates_TK = route_reference(probs_TE, dom_T, self.home_LG, self.spill_LJ, self.K,
                                               cfg.reference_gate == "uniform")
        else:
            return route_hash(ctx["tok_BS"].reshape(-1), self.hash_VK)
        if cfg.norm_topk:                         # Mixtral/DeepSeek form: gates sum to 1 over the k
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        return idx_TK, gates_TK

    def capacity(self, idx_TK, B, S, step):
        """Which assignments fit: all (dropless), or C = ceil(cf * tokens_in_scope * K / E) each."""
        cf, E, K = self.cfg.capacity_factor, self.E, self.K
        if cf == 0:
            return torch.ones_like(idx_TK, dtype=torch.bool)
        if self.cfg.capacity_scope == "sequence":
            return capacity_keep(idx_TK, E, math.ceil(cf * S * K / E), B)
        if self.cfg.capacity_scope == "micro":
            return capacity_keep(idx_TK, E, math.ceil(cf * B * S * K / E), 1)
        offset_E = step.capacity_offset(self.layer_id, F.one_hot(idx_TK.reshape(-1), E).sum(0))
        return capacity_keep(idx_TK, E, math.ceil(cf * step.step_tokens * K / E), 1, offset_E)

    def dispatch(self, x_TD, idx_TK, gates_TK):
        x_in, w_in, w_out = x_TD, self.w_in_EDH, self.w_out_EHD
        dev = x_TD.device.type
        if torch.is_autocast_enabled(dev):    # a custom op is not on autocast's list: cast as for
            dt = torch.get_autocast_dtype(dev)  # a matmul: the grouped GEMM's fast path is bf16
            x_in, w_in, w_out = x_TD.to(dt), w_in.to(dt), w_out.to(dt)
        cfg = self.cfg
        return moe_ffn(x_in, idx_TK, gates_TK, w_in, w_out, impl=cfg.impl, compile=cfg.compile)[0]

    def router_logits(self, x_TD):
        """W h_t in fp32 even under bf16 autocast: top-k and softmax are sensitive to rounding."""
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.router.weight.float())

    def expert_choice(self, x_TD, probs_TE, z, ent_sum, B, S):
        E, T, dev = self.E, x_TD.shape[0], x_TD.device
        C = T * self.K // E
        y_TD, tok_EC = expert_choice_ffn(x_TD, probs_TE, C, self.w_in_EDH, self.w_out_EHD)
        expert_EC = torch.arange(E, device=dev).repeat_interleave(C)
        assign_TE = torch.zeros(T, E, device=dev).index_put_((tok_EC.reshape(-1), expert_EC),
                                                             torch.ones(E * C, device=dev))
        chosen_T = assign_TE.sum(1) > 0
        # top-1 = the chosen expert with the largest probability; an unchosen token: its argmax
        top1_T = torch.where(chosen_T, (probs_TE * assign_TE).argmax(1), probs_TE.argmax(1))
        stats = dict(layer=self.layer_id, aux=z.new_zeros(()), z=z, counts_GE=None, ent_sum=ent_sum,
                     assign_TE=assign_TE, top1_T=top1_T, n_drop=(~chosen_T).sum(), n_slots=T)
        return y_TD.view(B, S, -1), stats


# ---------------- The rest of the model: byte-level decoder (RMSNorm, RoPE, causal SDPA)

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD, pos_S):
        B, S, D = x_BSD.shape
        qkv = self.qkv(x_BSD).view(B, S, 3, self.nh, D // self.nh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                   # each (B, nh, S, hd)
        q, k = rope(q, pos_S), rope(k, pos_S)                          # rotate half (GPT-NeoX form)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.w_in, self.w_out = nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False)

    def forward(self, x_BSD, ctx):
        return self.w_out(F.gelu(self.w_in(x_BSD))), None


class Block(nn.Module):
    def __init__(self, cfg, moe, n_domains, layer_id):
        super().__init__()
        self.ln1, self.ln2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        # the dense FFN has the width of K experts: the same active parameters
        self.ffn = (MoEFFN(cfg, n_domains, layer_id) if moe
                    else DenseFFN(cfg.d_model, cfg.top_k * cfg.expert_hidden))

    def forward(self, x, pos_S, ctx):
        x = x + self.attn(self.ln1(x), pos_S)
        y, stats = self.ffn(self.ln2(x), ctx)
        return x + y, stats


class Model(nn.Module):
    def __init__(self, cfg, n_domains):
        super().__init__()
        moe = set() if cfg.dense else set(moe_layer_ids(cfg))
        self.emb = nn.Embedding(256, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i in moe, n_domains, i) for i in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 256, bias=False)
        for name, p in self.named_parameters():             # GPT-2 init, scaled residual outputs
            if p.dim() == 2:
                out = name.endswith(("proj.weight", "w_out.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer) if out else 0.02)

    def forward(self, tok_BS, dom_B, step=None):
        pos_S = torch.arange(tok_BS.shape[1], device=tok_BS.device)
        ctx = dict(tok_BS=tok_BS, dom_B=dom_B, step=step)       # dom_B: only the reference reads it
        x, layer_stats = self.emb(tok_BS), []
        for blk in self.blocks:
            x, stats = blk(x, pos_S, ctx)
            if stats is not None:
                layer_stats.append(stats)
        return self.head(self.ln_f(x)), layer_stats


def moe_layer_ids(cfg):
    if cfg.moe_layers in ("upper", "all"):
        return list(range(cfg.n_layer // 2 if cfg.moe_layers == "upper" else 0, cfg.n_layer))
    try:
        ids = sorted({int(s) for s in cfg.moe_layers.split(",")})
    except ValueError:
        raise BadInput(f"--moe-layers must be 'upper', 'all' or comma-separated indices, "
                       f"got {cfg.moe_layers!r}") from None
    if not ids or ids[0] < 0 or ids[-1] >= cfg.n_layer:
        raise BadInput(f"--moe-layers {cfg.moe_layers!r}: indices must lie in [0, {cfg.n_layer})")
    return ids


# ---------------- Data: 8 procedural languages (or DIR/<domain>/*.txt), one domain per sequence

def load_domains(cfg):
    """The domains' train and held-out bytes (data/domains.py). Under torchrun rank 0 alone writes
    the text cache; the procedural languages are fixed (seed 0): --seed varies training only."""
    if cfg.data_dir:
        cache = os.path.join(cfg.out, "data_cache") if rank_world()[0] == 0 else None
        doms = text_domains(cfg.data_dir, cache_dir=cache)
    else:
        doms = synthetic_domains(seed=0, overlap=cfg.overlap, train_bytes=cfg.train_bytes)
    check_lengths(doms, cfg.seq_len)
    return doms


# ---------------- Training: an optimizer step = cfg.accum micro-batches on each of W ranks

def lr_at(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def micro_batches(cfg, doms, step, device):
    """This rank's micro-batches of step `step`. Every rank draws the same global batch (a function
    of seed and step); chunk c = m*W + r of mu = B/(W*accum) consecutive rows is micro-batch m of
    rank r. So W ranks x accum A see exactly the chunks one process sees with accum A*W, in the same
    (micro-batch-major) order."""
    rank, world = rank_world()
    mu = cfg.batch_size // (world * cfg.accum)
    arrays = train_batch(doms, cfg.batch_size, cfg.seq_len, cfg.seed, step,
                         by_domain=cfg.batch_order == "by_domain")
    for m in range(cfg.accum):
        c = (m * world + rank) * mu
        yield tuple(torch.from_numpy(np.ascontiguousarray(a[c:c + mu])).to(device) for a in arrays)


def balance_tokens(cfg, world):
    """Tokens one balancing group spans: a sequence, a micro-batch, or the whole optimizer step."""
    seqs = {"sequence": 1, "micro": cfg.batch_size // (world * cfg.accum)}.get(cfg.balance_scope,
                                                                                cfg.batch_size)
    return seqs * cfg.seq_len


def prepass_runs(cfg):
    """Does a training step run the routing pre-pass below? Global-scope aux loss with > 1
    micro-batch (and an MoE model: the dense baseline has nothing to count)."""
    return (not cfg.dense and cfg.router == "topk" and cfg.balance == "aux"
            and cfg.balance_scope == "global" and cfg.accum > 1)


@torch.no_grad()
def prepass_counts(model, cfg, chunks, device, index):
    """Global-scope aux loss with accumulation: f must count every token of the step before the
    first backward. One no-grad forward per micro-batch buys the exact one-pass gradient for ~1/3
    more compute (counted in train_flops_per_token); Megatron-core's running counts (--balance-scope
    running) skip it, and only the step's last micro-batch sees the whole f. -> {layer: (1, E)
    counts over the step and all ranks}"""
    routing, total = StepRouting(cfg.batch_size * cfg.seq_len, all_ranks_sum, index=index), {}
    for x, _, dom in chunks:
        with autocast(cfg, device):
            _, stats = model(x, dom, routing)
        for st in stats:
            total[st["layer"]] = total.get(st["layer"], 0) + st["counts_GE"]
    return {layer: all_ranks_sum(c) for layer, c in total.items()}


def accumulate_grads(net, cfg, doms, step, device, aux_only=False):
    """Forward + backward every micro-batch of this rank (DDP syncs on the last); the gradient of
    the step's mean loss (ce + aux + z), or of its aux loss alone. Returns (ce, aux) means over this
    rank's micro-batches (tensors: no host sync) and the records [(layer_stats, dom_B)]."""
    raw = getattr(net, "module", net)                      # under DDP the Model sits in .module
    chunks = list(micro_batches(cfg, doms, step, device))
    counts = prepass_counts(raw, cfg, chunks, device, step) if prepass_runs(cfg) else None
    routing = StepRouting(cfg.batch_size * cfg.seq_len, all_ranks_sum, counts, step)
    ce_sum = aux_sum = 0.0
    records = []
    for m, (x, y, dom) in enumerate(chunks):
        with net.no_sync() if net is not raw and m < cfg.accum - 1 else nullcontext():
            with autocast(cfg, device):
                logits, layer_stats = net(x, dom, routing)
            ce = F.cross_entropy(logits.float().view(-1, 256), y.reshape(-1))
            aux = sum((st["aux"] for st in layer_stats), ce.new_zeros(()))
            z = sum((st["z"] for st in layer_stats), ce.new_zeros(()))
            loss = aux + 0.0 * ce if aux_only else ce + aux + z
            (loss / cfg.accum).backward()
        ce_sum, aux_sum = ce_sum + ce.detach(), aux_sum + aux.detach()
        records.append((layer_stats, dom))
    return ce_sum / cfg.accum, aux_sum / cfg.accum, records


def train_step(net, opt, cfg, doms, step, device):
    """One optimizer step. Returns (ce, aux) averaged over ranks (tensors) and this rank's routing
    records."""
    for g in opt.param_groups:
        g["lr"] = lr_at(cfg, step)
    opt.zero_grad(set_to_none=True)
    ce, aux, records = accumulate_grads(net, cfg, doms, step, device)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    if cfg.balance == "aux_free" and cfg.router == "topk":
        raw = getattr(net, "module", net)
        for i, ffn in enumerate(b.ffn for b in raw.blocks if isinstance(b.ffn, MoEFFN)):
            per_micro = [stats[i]["counts_GE"] for stats, _ in records]
            if cfg.balance_scope == "global":              # one group: the step, every rank
                counts_GE = all_ranks_sum(sum(per_micro[1:], per_micro[0]))
            else:                                          # every sequence / micro-batch votes
                counts_GE = torch.cat(per_micro)
            update_bias(ffn.bias_E, counts_GE, cfg.bias_rate)
    ce_aux = all_ranks_sum(torch.stack([ce, aux])) / rank_world()[1]
    return ce_aux[0], ce_aux[1], records


def make_optimizer(model, cfg, device):
    fused = torch.device(device).type == "cuda"          # one kernel for all parameters (CUDA only)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0,
                             fused=fused)


def wrap_ddp(model, cfg):
    """DistributedDataParallel over the ranks (the plain model in one process). The aux-free bias is
    kept equal on all ranks by update_bias; the hash router leaves the router weight without a
    gradient."""
    if rank_world()[1] == 1:
        return model
    return DDP(model, find_unused_parameters=cfg.router == "hash")


def train(model, opt, cfg, doms, name, device, state, end, ckpt_path, quiet=False):
    """Optimizer steps state["step"] .. end-1 (state: step, train_s, history; updated). Every
    --log-every steps a log line with the step batch's routing (log_step); every --ckpt-every steps
    a checkpoint."""
    rank, start = rank_world()[0], state["step"]
    net = wrap_ddp(model, cfg)
    bar = progress(range(start, end), name, cfg.steps, initial=start, quiet=rank != 0 or quiet)
    t0 = time.perf_counter()
    for step in bar:
        t_step = time.perf_counter()
        ce, aux, records = train_step(net, opt, cfg, doms, step, device)
        state["train_s"] += time.perf_counter() - t_step
        state["step"] = step + 1
        if state["step"] % cfg.log_every == 0 or state["step"] == end:
            tok_s = (step + 1 - start) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
            state["history"] += log_step(cfg, name, doms, device, step, ce.item(), aux.item(),
                                         records, tok_s, quiet)
            bar.set_postfix(bpb=f"{ce.item() / math.log(2):.3f}")
        if rank == 0 and (state["step"] % cfg.ckpt_every == 0 or state["step"] == end):
            save_checkpoint(ckpt_path, model, cfg, opt=opt.state_dict(), rng=torch.get_rng_state(),
                            **state)
    bar.close()
    return state


def log_step(cfg, name, doms, device, step, ce, aux, records, tok_s, quiet):
    """Step `step`'s log line, its metrics.jsonl record and its routing history (the training
    batch's routing, this rank's share, per MoE layer) -> the history records."""
    L, acc = len(doms.names), {}
    for layer_stats, dom in records:
        add_record(acc, layer_stats, dom.repeat_interleave(cfg.seq_len).cpu(), L, cfg.experts)
    home_LG = reference_groups(L, cfg.experts, cfg.top_k)[0].numpy()
    recs = step_history(acc, home_LG, step + 1, ce / math.log(2))
    layers = "".join(f" | L{r['layer']} U {r['utilization']:.3f} MaxVio {r['maxvio']:.2f} purity "
                     f"{r['purity']:.3f}" for r in recs)
    say(f"[{name}] step {step + 1:5d} | train bpb {ce / math.log(2):.3f} | aux {aux:.4f}{layers} | "
        f"{tok_s:,.0f} tok/s" + flops_note(cfg, device, tok_s, prepass_runs(cfg)), quiet)
    if rank_world()[0] == 0:
        log_metrics(os.path.join(cfg.out, "metrics.jsonl"), run=name, seed=cfg.seed, step=step + 1,
                    loss=round(ce, 5), bpb=round(ce / math.log(2), 5), aux=round(aux, 6),
                    lr=lr_at(cfg, step),
                    **{f"L{r['layer']}_{k}": r[k] for r in recs for k in ("purity", "utilization")})
    return recs


# ---------------- Evaluation

@torch.no_grad()
def evaluate(model, cfg, doms, device):
    """Held-out bits per byte per domain, and routing metrics per MoE layer and averaged over
    layers. The windows go through in "steps" of --batch-size sequences and micro-batches of
    B/(W*accum), ordered as in training, so capacity and expert choice see the scopes they saw in
    training."""
    model.eval()
    L, E = len(doms.names), cfg.experts
    vx, vy, vdom = val_windows(doms, cfg.seq_len, cfg.eval_seqs)
    mu = cfg.batch_size // (rank_world()[1] * cfg.accum)
    nll_L, n_L, acc = np.zeros(L), np.zeros(L), {}
    nll_S = np.zeros(cfg.seq_len)                          # per position in the window, summed
    feats, hooks = probe_inputs(m for m in model.modules() if isinstance(m, MoEFFN))
    wins = []                                              # the windows, in the order they ran
    for s0 in range(0, len(vx), cfg.batch_size):
        rows = np.arange(s0, min(s0 + cfg.batch_size, len(vx)))
        if cfg.batch_order == "by_domain":
            rows = rows[np.argsort(vdom[rows], kind="stable")]
        routing = StepRouting(cfg.batch_size * cfg.seq_len, lambda t: t)        # this process only
        for i in range(0, len(rows), mu):
            x, y, dom = (torch.from_numpy(a[rows[i:i + mu]]).to(device) for a in (vx, vy, vdom))
            wins.append(rows[i:i + mu])
            with autocast(cfg, device):
                logits, layer_stats = model(x, dom, routing)
            nll_BS = F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1),
                                     reduction="none").view(y.shape)
            np.add.at(nll_L, dom.cpu().numpy(), nll_BS.sum(1).cpu().numpy())
            nll_S += nll_BS.sum(0).cpu().numpy()
            np.add.at(n_L, dom.cpu().numpy(), y.shape[1])
            add_record(acc, layer_stats, dom.repeat_interleave(cfg.seq_len).cpu(), L, E)
    model.train()
    for h in hooks:
        h.remove()
    bpb_S = nll_S / len(vx) / math.log(2)
    bpb_L = nll_L / n_L / math.log(2)
    out = dict(val_bpb=float(nll_L.sum() / n_L.sum() / math.log(2)),
               bpb_by_position=bpb_S.round(4).tolist(),
               per_domain_bpb={n: round(float(b), 4) for n, b in zip(doms.names, bpb_L)})
    home_LG = reference_groups(L, E, cfg.top_k)[0].numpy()
    return dict(out, **routing_summary(acc, feats, wins, vdom, bpb_S, home_LG))


# ---------------- The experiment: the configurations a sweep compares; one run, trained, evaluated

def sweep_plan(cfg, world=1):
    """[(name, overrides)] for --sweep scopes | balance | capacity."""
    aux, none, scopes = dict(balance="aux"), dict(balance="none"), ("sequence", "micro", "global")
    if cfg.sweep == "scopes":                          # every router / scope at the given --accum
        return ([("reference", dict(none, router="reference")),
                 ("reference-uniform", dict(none, router="reference", reference_gate="uniform")),
                 ("hash", dict(none, router="hash")), ("topk-none", dict(none, router="topk"))]
                + [(f"aux-{s}", dict(aux, balance_scope=s)) for s in scopes]
                + [(f"auxfree-{s}", dict(balance="aux_free", balance_scope=s)) for s in scopes[1:]]
                + [("expert-choice", dict(none, router="expert_choice"))])
    if cfg.sweep == "balance":    # aux loss over groups of n sequences: 1, micro-batches of n, B
        per_rank = cfg.batch_size // world
        return ([("balance-1", dict(aux, balance_scope="sequence"))]
                + [(f"balance-{n}", dict(aux, balance_scope="micro", accum=per_rank // n))
                   for n in (2 ** i for i in range(1, 30)) if n < per_rank and per_rank % n == 0]
                + [(f"balance-{cfg.batch_size}", dict(aux, balance_scope="global"))])
    base = dict(aux, balance_scope="global", batch_order="by_domain")            # capacity
    return [("dropless", base)] + [
        (f"cf{cf:g}-{s}", dict(base, capacity_factor=cf, capacity_scope=s))
        for cf in (1.0, 1.25) for s in scopes]


def run_name(cfg):
    if cfg.dense:
        return "dense"
    if cfg.router != "topk":
        uniform = cfg.router == "reference" and cfg.reference_gate == "uniform"
        name = cfg.router.replace("_", "-") + ("-uniform" if uniform else "")
    elif cfg.balance == "none":
        name = "topk-none"
    else:
        name = f"{cfg.balance.replace('_', '')}-{cfg.balance_scope}"
        name += f"-ref{cfg.reference_steps}" if cfg.reference_steps else ""
    cap = f"-cf{cfg.capacity_factor:g}-{cfg.capacity_scope}" if cfg.capacity_factor else ""
    return name + cap


def run_one(cfg, doms, name, device, quiet=False):
    """Train (or resume) one configuration, evaluate it -> its result (None after --stop-at). Under
    torchrun every rank trains; rank 0 alone logs, checkpoints, evaluates (no collectives in there)
    and writes; the other ranks return {}."""
    run_dir = os.path.join(cfg.out, f"{name}-s{cfg.seed}")
    res_path, ckpt_path = os.path.join(run_dir, "result.json"), os.path.join(run_dir, "ckpt.pt")
    key = config_key(cfg, RESUME_FREE)
    done = cfg.resume and not cfg.stop_at and finished_result(res_path, key)
    if done:
        say(f"[{name} seed {cfg.seed}] finished earlier: reusing {res_path}")
        return done
    if rank_world()[0] == 0:
        os.makedirs(run_dir, exist_ok=True)
    model, opt, state = start_or_resume(cfg, doms, name, device, ckpt_path)
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    state = train(model, opt, cfg, doms, name, device, state, end, ckpt_path, quiet)
    if end < cfg.steps:
        say(f"[{name}] stopped at step {end} (--stop-at); continue with --resume", quiet)
        return None
    if rank_world()[0] != 0:
        return {}
    res = result_record(cfg, name, evaluate(model, cfg, doms, device), state)
    write_json(res_path, res)
    return res


def bench_model(cfg, doms, device, kind):
    """What --bench times (kernels.cost.bench), from the seed's weights: the MoE model, the dense
    one (same active parameters) or the MoE one without the pre-pass -> (Config, model, step(i))."""
    over = {"moe": {}, "dense": dict(dense=True), "moe_no_prepass": dict(balance_scope="running")}
    c = Config(**{**asdict(cfg), **over[kind]})
    torch.manual_seed(cfg.seed)
    m = Model(c, len(doms.names)).to(device)
    opt = make_optimizer(m, c, device)
    return c, m, lambda i: train_step(m, opt, c, doms, i, device)


# ---------------- Plumbing: command line, validation, runs and results

MODEL, ROUTING, TRAIN, DATA = "model", "routing and balancing", "training", "data"
RUNS, MACHINE = "runs and output", "machine"


@dataclass
class Config:                       # one flag each; what they do, measured: docs/moe_testbed.md
    experts: int = flag(8, "number of experts E per MoE layer", MODEL)
    top_k: int = flag(2, "experts per token K (expert choice: T*K/E tokens per expert)", MODEL)
    n_layer: int = flag(2, "transformer blocks", MODEL)
    moe_layers: str = flag("upper", "blocks with an MoE FFN: upper (half), all, or 1,2", MODEL)
    d_model: int = flag(128, "model width D", MODEL)
    n_head: int = flag(4, "attention heads", MODEL)
    expert_hidden: int = flag(128, "hidden width H of one expert (a dense FFN gets K*H)", MODEL)
    dense: bool = flag(False, "train the dense baseline (FFN width K*H) instead", MODEL)
    router: str = flag("topk", "reference = domain-label oracle; expert_choice is not causal",
                       ROUTING, ("reference", "topk", "expert_choice", "hash"))
    reference_gate: str = flag("learned", "reference: gates = router probs, or uniform 1/K "
                               "(round-robin)", ROUTING, ("learned", "uniform"))
    reference_steps: int = flag(0, "topk: route by domain label for N steps, then learn", ROUTING)
    balance: str = flag("aux", "topk only: aux = Switch/GShard aux loss, aux_free = DeepSeek-V3 "
                        "selection bias", ROUTING, ("none", "aux", "aux_free"))
    balance_scope: str = flag("global", "what a balancing group spans: a sequence, a micro-batch, "
                              "the optimizer step (global; --accum > 1: a no-grad pre-pass, ~+1/3 "
                              "compute) or its micro-batches so far (running, Megatron-core)",
                              ROUTING, ("sequence", "micro", "global", "running"))
    aux_coef: float = flag(0.01, "aux loss coefficient alpha", ROUTING)
    z_coef: float = flag(0.001, "router z-loss coefficient (learned routers)", ROUTING)
    bias_rate: float = flag(1e-3, "aux_free bias update rate gamma", ROUTING)
    capacity_factor: float = flag(0.0, "C = ceil(cf*tokens*K/E) per expert; 0: dropless", ROUTING)
    capacity_scope: str = flag("micro", "tokens one capacity spans (global: queues run across the "
                               "step)", ROUTING, ("sequence", "micro", "global"))
    norm_topk: bool = flag(False, "gates renormalised over the k (Mixtral/DeepSeek)", ROUTING)
    batch_size: int = flag(32, "sequences per optimizer step (all processes, micro-batches)", TRAIN)
    accum: int = flag(1, "micro-batches per optimizer step on each process", TRAIN)
    steps: int = flag(1000, "optimizer steps", TRAIN)
    lr: float = flag(3e-3, "peak AdamW learning rate (warmup, cosine decay to 10%%)", TRAIN)
    warmup: int = flag(100, "warmup steps", TRAIN)
    seed: int = flag(0, "seed for weights and batches (the languages are fixed: seed 0)", TRAIN)
    seeds: str = flag("", "comma-separated seeds, e.g. 0,1,2: every run, mean ± sample std", TRAIN)
    seq_len: int = flag(128, "bytes per training sequence", DATA)
    overlap: float = flag(0.1, "procedural data: share of loanwords common to all languages", DATA)
    train_bytes: int = flag(300_000, "procedural data: training bytes per domain", DATA)
    data_dir: str = flag("", "real text instead: DIR/<domain>/*.txt (UTF-8), >= 2 domains", DATA)
    eval_seqs: int = flag(32, "held-out sequences per domain for evaluation", DATA)
    batch_order: str = flag("mixed", "by_domain: a batch sorted by domain", DATA,
                            ("mixed", "by_domain"))
    quick: bool = flag(False, "a tiny configuration, < 1 min on 2 CPU cores", RUNS)
    sweep: str = flag("", "scopes = every router and scope, balance = aux loss over groups of "
                      "1, 2, 4, ... sequences, capacity = cf 1.0/1.25 x capacity scope", RUNS,
                      ("scopes", "balance", "capacity"), const="scopes")
    jobs: int = flag(1, "run a sweep's (or --seeds') runs in this many worker processes", RUNS)
    bench: bool = flag(False, "time MoE vs dense training steps side by side: the ratio", RUNS)
    log_every: int = flag(100, "steps between log lines, metrics.jsonl and routing records", RUNS)
    ckpt_every: int = flag(250, "steps between checkpoints", RUNS)
    stop_at: int = flag(0, None, RUNS)                     # hidden (tests): stop as if interrupted
    out: str = flag(os.path.join("out", "moe_testbed"), "output folder: results.json, "
                    "metrics.jsonl, PNGs, a folder per run with its checkpoint", RUNS)
    resume: bool = flag(False, "continue each run from its checkpoint (reuse finished runs)", RUNS)
    device: str = flag("auto", "cuda, then mps, else cpu", MACHINE, ("auto", "cpu", "cuda", "mps"))
    dtype: str = flag("float32", "bf16 autocast (router in fp32)", MACHINE, ("float32", "bfloat16"))
    threads: int = flag(0, "torch threads per process; 0 = default (--jobs N: cores // N)", MACHINE)
    compile: bool = flag(False, "torch.compile attention and the expert dispatch", MACHINE)
    impl: str = flag("grouped", "expert dispatch in kernels.moe_ffn", MACHINE, ("grouped", "loop"))
    preset: str = flag("cpu", "gpu: d512, 8 blocks, 64x512, bf16, compile", MACHINE, ("cpu", "gpu"))


GPU = dict(d_model=512, n_head=8, n_layer=8, expert_hidden=1024, seq_len=512, batch_size=64,
           accum=2, lr=1e-3, warmup=200, eval_seqs=64, train_bytes=4_000_000, dtype="bfloat16",
           compile=True)                                   # --preset gpu
QUICK = dict(d_model=64, expert_hidden=64, seq_len=64, batch_size=16, steps=300, warmup=30,
             train_bytes=50_000, eval_seqs=8, log_every=100,
             out=os.path.join("out", "moe_testbed_quick"))  # --quick
# may differ between an interrupted run and its resumption; everything else must match
RESUME_FREE = ("threads", "quick", "resume", "stop_at", "out", "log_every", "ckpt_every", "sweep",
               "seeds", "device", "compile", "impl", "preset", "jobs")


def parse_args(argv):
    """Flags -> Config: the defaults, then --preset's values, then --quick's, then flags given."""
    return parse_flags(Config, argv, "moe_testbed.py", __doc__,
                       presets=[("preset", "gpu", GPU), ("quick", True, QUICK)])


def validate(cfg, world=1):
    """Every check that can fail, before any process group exists: all ranks see the same flags
    and WORLD_SIZE, so they all fail alike and exit without waiting for each other."""
    check_numbers(cfg, ("experts", "top_k", "n_layer", "d_model", "n_head", "expert_hidden",
                        "seq_len", "batch_size", "accum", "steps", "eval_seqs", "log_every",
                        "ckpt_every", "train_bytes", "jobs", "lr"), ("warmup", "stop_at",
                  "reference_steps", "aux_coef", "z_coef", "bias_rate", "capacity_factor"))
    need(cfg.reference_steps == 0 or cfg.router == "topk",
         "--reference-steps applies to --router topk only")
    need(cfg.balance_scope != "running" or cfg.balance != "aux_free", "--balance-scope running "
         "counts the aux loss's f; aux_free moves its bias after the step: use micro or global")
    need(cfg.top_k <= cfg.experts, f"--top-k {cfg.top_k} is larger than --experts {cfg.experts}")
    need(cfg.d_model % cfg.n_head == 0 and (cfg.d_model // cfg.n_head) % 2 == 0,
         f"--d-model {cfg.d_model} must be a multiple of 2*--n-head ({2 * cfg.n_head}) for RoPE")
    need(world >= 1 and cfg.batch_size % (world * cfg.accum) == 0, f"--batch-size {cfg.batch_size} "
         f"must be divisible by --accum {cfg.accum} x the number of processes (WORLD_SIZE={world})")
    mu = cfg.batch_size // (world * cfg.accum)
    need(cfg.capacity_factor == 0 or cfg.router != "expert_choice", "--capacity-factor does not "
         "apply to expert_choice (every expert takes exactly T*K/E tokens)")
    need(cfg.router != "expert_choice" or mu * cfg.seq_len * cfg.top_k >= cfg.experts,
         "expert_choice needs a micro-batch of at least experts/top-k tokens")
    need(0.0 <= cfg.overlap <= 1.0, f"--overlap must be in [0, 1], got {cfg.overlap}")
    need(not (cfg.sweep and (cfg.dense or cfg.bench)), "--sweep cannot be combined with --dense or "
         "--bench")
    need(world == 1 or not cfg.bench, "--bench times two models in one process: run it without "
         "torchrun")
    need(world == 1 or cfg.jobs == 1, "--jobs runs worker processes: not under torchrun")
    moe_layer_ids(cfg)
    parse_seeds(cfg.seeds, cfg.seed)
    for _, o in sweep_plan(cfg, world) if cfg.sweep else ():    # every run of a sweep, too
        validate(Config(**{**asdict(cfg), **o, "sweep": ""}), world)


def prepare(cfg, world):
    """Checks, device, threads, output folder, data: every rank, before the process group."""
    validate(cfg, world)
    device = pick_device(cfg.device)
    need(cfg.preset != "gpu" or device.type == "cuda", f"--preset gpu is sized for a CUDA GPU, but "
         f"the device is {device}; use the default --preset cpu")
    set_threads(cfg.threads)
    writable_dirs(out=cfg.out)                             # every rank checks: they all fail alike
    return device, load_domains(cfg)


def main(argv=None):
    """parse -> validate, load (every rank, before the process group) -> run -> report."""
    return main_distributed("moe_testbed.py", argv, parse_args, prepare, run,
                            errors=(BadInput, DataError))


def run(cfg, doms, device):
    """The bench, or every (configuration, seed) of the run or sweep; rank 0 reports and writes."""
    t0, (rank, world) = time.time(), rank_world()
    mu = cfg.batch_size // (world * cfg.accum)
    say(f"device {device} | torch {torch.__version__} | {len(doms.names)} domains: "
        f"{', '.join(doms.names)} | {sum(map(len, doms.train)):,} train / "
        f"{sum(map(len, doms.val)):,} val bytes | step = {cfg.accum} micro-batch(es) of {mu} "
        f"sequences" + (f" x {world} processes ({dist.get_backend()})" if world > 1 else ""))
    dispatch = run_dispatch(cfg, device)
    say(f"expert dispatch: {dispatch['impl']}, grouped GEMM route {dispatch['route']}"
        + dispatch["note"])
    if cfg.bench:
        out = bench(lambda kind: bench_model(cfg, doms, device, kind), prepass_runs(cfg), device)
        report_bench(out)
        res = dict(config=asdict(cfg), dispatch=dispatch, bench=out)
    else:
        if cfg.sweep == "scopes" and mu == cfg.batch_size // world:
            say("note: --accum 1: micro and global scope are one run (a micro-batch is the step)")
        plan = sweep_plan(cfg, world) if cfg.sweep else [(run_name(cfg), {})]
        if rank == 0 and not cfg.resume:                   # a rerun keeps earlier run folders, PNGs
            keep_previous(cfg.out, also=lambda f: f.endswith(".png") or any(
                os.path.isfile(os.path.join(cfg.out, f, x)) for x in ("result.json", "ckpt.pt")))
        out = run_all(cfg, [(n, Config(**{**asdict(cfg), **o})) for n, o in plan], doms, device)
        if out is None or rank != 0:
            return None
        report(cfg, out, device, time.time() - t0)
        res = dict(config=asdict(cfg), world_size=world, dispatch=dispatch, runs=out)
    write_results(cfg.out, res, keep=not cfg.resume)
    say(f"wrote {os.path.join(cfg.out, 'results.json')}")
    return out


def run_all(cfg, plan, doms, device):
    """Every (seed, configuration): here, or in --jobs worker processes (the same numbers: each run
    seeds itself, and batches are a function of (seed, step)). None after --stop-at."""
    todo = [(Config(**{**asdict(c), "seed": s}), doms, name, device)
            for s in parse_seeds(cfg.seeds, cfg.seed) for name, c in plan]
    for name in dict.fromkeys(n for c, _, n, _ in todo if c.router == "expert_choice"):
        say(f"[{name}] note: expert choice is NOT causal (routing depends on later tokens)")
    runs = []
    for res in run_each(run_one, todo, cfg.jobs, cfg.threads):
        if res is None:                                    # --stop-at
            return None
        runs.append(res)
        report_run(res, doms.names)                        # ranks > 0 return {}: nothing shown
    return runs


def start_or_resume(cfg, doms, name, device, ckpt_path):
    """The model (same initial weights on every rank), its optimizer and where training stands:
    step 0, or (--resume) the checkpoint's step, time, history and RNG state, on every rank."""
    torch.manual_seed(cfg.seed)
    model = Model(cfg, len(doms.names)).to(device)
    opt = make_optimizer(model, cfg, device)
    state = restore(ckpt_path, cfg, RESUME_FREE, device, model, opt) if cfg.resume else None
    if state:
        say(f"[{name} seed {cfg.seed}] resuming at step {state['step']}")
    if cfg.compile:
        for blk in model.blocks:
            blk.attn = torch.compile(blk.attn)
    return model.train(), opt, state or dict(step=0, train_s=0.0, history=[])


def result_record(cfg, name, res, state):
    """One run in results.json: what it ran, its evaluation, its routing history, its speed."""
    world, router = rank_world()[1], "dense" if cfg.dense else cfg.router
    balance = cfg.balance if router == "topk" else "none"
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    return dict(name=name, router=router, balance=balance, accum=cfg.accum,
                scope=cfg.balance_scope if balance != "none" else None,
                balance_tokens=balance_tokens(cfg, world) if balance != "none" else None,
                capacity_factor=cfg.capacity_factor,
                capacity_scope=cfg.capacity_scope if cfg.capacity_factor else None, seed=cfg.seed,
                **res, history=state["history"], tokens_per_s=tokens / max(state["train_s"], 1e-9),
                train_s=round(state["train_s"], 1), world_size=world,
                config_key=config_key(cfg, RESUME_FREE))


if __name__ == "__main__":
    exit_process(main)

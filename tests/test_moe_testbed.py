"""Tests for moe_testbed.py, with its metrics (data/routing.py) and FLOPs (kernels/cost.py):
metrics, losses and capacity against slow, obviously correct oracles; routers; gradient
accumulation against the one-pass step; tiny end-to-end runs (history, sweeps with --jobs, resume,
bad input)."""

import concurrent.futures
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import moe_testbed as mt  # noqa: E402
from data import routing, run  # noqa: E402
from kernels import cost, moe_ffn  # noqa: E402

CPU = torch.device("cpu")


def _record(assign, top1, drop=0, slots=1):
    return dict(assign=assign, top1=top1, drop=drop, slots=slots, ent=None)


# ---------------------------------------------------------------- metrics on hand-built routing

def test_perfect_specialization_purity_nmi_agreement_one():
    L = E = 8
    top1 = np.diag(np.full(L, 100.0))              # domain d -> expert d, always
    home_LG = mt.reference_groups(L, E, 2)[0].numpy()
    m = routing.routing_metrics(_record(2 * top1, top1, 0, 1600), home_LG)
    assert m["purity"] == 1.0 and abs(m["nmi"] - 1.0) < 1e-12 and m["maxvio"] == pytest.approx(0.0)
    assert m["agreement"] == 1.0 and m["utilization"] == pytest.approx(1.0)
    assert m["dead_experts"] == 0


def test_permuted_specialization_is_matched():
    perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
    top1 = np.zeros((8, 8))
    top1[np.arange(8), perm] = 50.0                  # domain d -> expert perm[d]
    agr, match = routing.agreement(top1, mt.reference_groups(8, 8, 2)[0].numpy())
    assert agr == 1.0 and (match[perm] == np.arange(8)).all()
    assert routing.purity(top1) == 1.0


def test_uniform_routing_u_one_nmi_zero_and_collapse():
    uniform = np.ones((8, 8))
    f = uniform.sum(0) / uniform.sum()
    assert routing.utilization(f) == pytest.approx(1.0) and routing.dead_experts(f) == 0
    assert routing.nmi(uniform) == pytest.approx(0.0, abs=1e-12)
    assert routing.purity(uniform) == pytest.approx(1 / 8)
    collapse = np.zeros((8, 8))
    collapse[:, 2] = 10.0
    f = collapse.sum(0) / collapse.sum()
    assert routing.utilization(f) == pytest.approx(1 / 8) and routing.dead_experts(f) == 7
    assert routing.max_violation(f) == pytest.approx(7.0)   # (max load - mean) / mean = (8 - 1) / 1
    assert routing.nmi(collapse) == 0.0


def test_nmi_against_formula():
    rng = np.random.default_rng(0)
    M = rng.integers(0, 20, (4, 6)).astype(float)
    p = M / M.sum()
    mi = sum(p[i, j] * math.log(p[i, j] / (p[i].sum() * p[:, j].sum()))
             for i in range(4) for j in range(6) if p[i, j] > 0)
    h = lambda q: -sum(x * math.log(x) for x in q if x > 0)
    assert routing.nmi(M) == pytest.approx(mi / math.sqrt(h(p.sum(1)) * h(p.sum(0))))


def test_table_cells_are_mean_and_sample_std():
    runs = [dict(name="a", val_bpb=v, maxvio=None) for v in (1.0, 2.0, 4.0)]
    runs += [dict(name="b", val_bpb=5.0)]
    (_, n_a, a), (_, n_b, b) = run.table_rows(runs, routing.COLS)
    assert (n_a, a[0], a[2]) == (3, f"{7 / 3:.3f} ± {np.std([1, 2, 4], ddof=1):.3f}", "-")
    assert (n_b, b[0]) == (1, "5.000")


# ---------------------------------------------------------------- aux loss, aux-free bias

def slow_aux(probs_TE, idx_TK, n_groups, coef):
    """Oracle: loop over groups of consecutive tokens, count slots by hand."""
    T, E = probs_TE.shape
    n = T // n_groups
    losses = []
    for g in range(n_groups):
        p = probs_TE[g * n:(g + 1) * n]
        ids = idx_TK[g * n:(g + 1) * n].reshape(-1).tolist()
        f = torch.tensor([ids.count(i) / len(ids) for i in range(E)])
        losses.append(coef * E * sum(f[i] * p[:, i].mean() for i in range(E)))
    return sum(losses) / len(losses)


def _routing(T=40, E=4, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    return logits, probs, probs.topk(K, -1).indices


def _counts(idx, G, E=4):
    return F.one_hot(idx.reshape(G, -1), E).sum(1).float()


@pytest.mark.parametrize("G", [1, 2, 8])
def test_aux_loss_matches_oracle(G):
    _, probs, idx = _routing()
    got = mt.aux_loss(probs, _counts(idx, G), 0.01)
    assert got.item() == pytest.approx(slow_aux(probs, idx, G, 0.01).item(), rel=1e-6)


def test_gradient_scale_does_not_depend_on_scope():
    """If every sequence routes the same way (same f everywhere), all scopes are the same loss and
    gradient."""
    S, E = 6, 4
    logits = torch.randn(1, S, E).repeat(4, 1, 1).reshape(24, E).requires_grad_()
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    grads = [torch.autograd.grad(mt.aux_loss(probs, _counts(idx, G), 0.01), logits,
                                 retain_graph=True)[0] for G in (4, 2, 1)]
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])


def test_aux_free_bias_moves_toward_underloaded():
    bias = torch.zeros(4)
    counts = torch.tensor([[10.0, 4.0, 4.0, 2.0]])                    # expert 0 overloaded, 3 under
    mt.update_bias(bias, counts, 1e-3)
    assert bias[0] < 0 and bias[3] > 0 and bias[1] > 0
    bias2 = torch.zeros(4)                                            # two micro groups disagreeing
    mt.update_bias(bias2, torch.tensor([[9.0, 1, 1, 1], [1, 1, 1, 9.0]]), 1e-3)
    torch.testing.assert_close(bias2, torch.tensor([0.0, 1e-3, 1e-3, 0.0]))


# -------------------------------------------------------- capacity per scope against a queue oracle

def slow_keep(idx_TK, E, C, group_tokens, start=None):
    """Oracle: walk the assignments in token order (t*K + k); each group of `group_tokens` tokens
    has fresh queues of C slots per expert, starting at `start` (earlier assignments of the scope)
    if given."""
    T, K = idx_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for g0 in range(0, T, group_tokens):
        used = [0] * E if start is None else list(start)
        for t in range(g0, g0 + group_tokens):
            for k in range(K):
                e = int(idx_TK[t, k])
                keep[t, k] = used[e] < C
                used[e] += 1
    return keep


@pytest.mark.parametrize("G", [1, 4])
def test_capacity_keep_matches_queue_oracle(G):
    idx = torch.randint(0, 5, (24, 2), generator=torch.Generator().manual_seed(G))
    idx[:, 1] = (idx[:, 0] + 1 + idx[:, 1] % 4) % 5                 # two distinct experts per token
    for C in (1, 2, 3, 7):
        torch.testing.assert_close(mt.capacity_keep(idx, 5, C, G), slow_keep(idx, 5, C, 24 // G))
    off = torch.tensor([3, 0, 5, 1, 2])
    torch.testing.assert_close(mt.capacity_keep(idx, 5, 4, 1, off),
                               slow_keep(idx, 5, 4, 24, off.tolist()))


def test_micro_capacity_equals_the_kernel_capacity_dispatch():
    """Micro scope = one forward = what kernels.moe_ffn(impl='capacity') drops (an independent
    implementation)."""
    g = torch.Generator().manual_seed(1)
    x, w_in = torch.randn(32, 6, generator=g), torch.randn(5, 6, 7, generator=g)
    w_out = torch.randn(5, 7, 6, generator=g)
    idx = torch.randn(32, 5, generator=g).topk(2, -1).indices
    gates = torch.rand(32, 2, generator=g)
    for cf in (0.5, 1.0, 1.25):
        keep = mt.capacity_keep(idx, 5, math.ceil(cf * 32 * 2 / 5), 1)
        y_ref, dropped = moe_ffn(x, idx, gates, w_in, w_out, impl="capacity", capacity_factor=cf)
        assert torch.equal(keep, ~dropped)
        # the testbed's zero-gate drop
        y, _ = moe_ffn(x, idx, gates * keep, w_in, w_out, impl="loop")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_global_capacity_queues_run_across_chunks():
    """Two chunks (micro-batches) of one step through StepRouting == one queue over the
    concatenation."""
    idx = torch.randint(0, 4, (20, 1), generator=torch.Generator().manual_seed(3))
    routing = mt.StepRouting(20, lambda t: t)
    keeps = []
    for chunk in (idx[:8], idx[8:]):
        off = routing.capacity_offset(0, F.one_hot(chunk.reshape(-1), 4).sum(0))
        keeps.append(mt.capacity_keep(chunk, 4, 3, 1, off))
    torch.testing.assert_close(torch.cat(keeps), slow_keep(idx, 4, 3, 20))


# ---------------------------------------------------------------- routers

def _cfg(**kw):
    base = dict(experts=4, top_k=2, n_layer=2, d_model=16, n_head=2, expert_hidden=8, seq_len=8,
                batch_size=4, steps=6, warmup=2, eval_seqs=2, log_every=3, ckpt_every=2)
    base.update(kw)
    return mt.Config(**base)


def _ctx(B, S, dom=None):
    return dict(tok_BS=torch.zeros(B, S, dtype=torch.long),
                dom_B=torch.zeros(B, dtype=torch.long) if dom is None else dom)


def test_capacity_drop_count():
    cfg = _cfg(router="topk", balance="aux_free", capacity_factor=1.0, batch_size=2)
    moe = mt.MoEFFN(cfg, 8)
    torch.nn.init.zeros_(moe.router.weight)                          # equal probs: the bias decides
    moe.bias_E.copy_(torch.tensor([1.0, 0.5, 0.0, 0.0]))            # everyone picks experts 0 and 1
    y, st = moe(torch.randn(2, 8, 16), _ctx(2, 8))                            # T = 16, K = 2, E = 4
    # C = ceil(1.0 * 16 * 2 / 4) = 8 slots per expert; 16 tokens want expert 0 and 16 want expert 1
    assert st["n_slots"] == 32 and int(st["n_drop"]) == 16
    # priority is token order: the last 8 tokens lost both experts and output exactly zero
    assert torch.all(y.view(16, 16)[8:] == 0) and torch.all(y.view(16, 16)[:8] != 0)
    seq = mt.MoEFFN(mt.Config(**{**mt.asdict(cfg), "capacity_scope": "sequence"}), 8)
    seq.load_state_dict(moe.state_dict())
    y, st = seq(torch.randn(2, 8, 16), _ctx(2, 8))
    # per sequence: C = ceil(1.0 * 8 * 2 / 4) = 4; in each sequence tokens 4..7 lose both experts
    y = y.view(2, 8, 16)
    assert int(st["n_drop"]) == 16 and torch.all(y[:, 4:] == 0) and torch.all(y[:, :4] != 0)


def test_topk_output_uses_raw_probabilities_as_gates():
    """y_t = sum_{i in top-k} p_ti * E_i(h_t), p = softmax over ALL experts (not renormalised): loop
    oracle."""
    moe = mt.MoEFFN(_cfg(router="topk", balance="none"), 8)
    x = torch.randn(2, 8, 16)
    y, st = moe(x, _ctx(2, 8))
    x_TD = x.view(16, 16)
    probs = moe.router(x_TD).softmax(-1)
    ref = torch.zeros(16, 16)
    for t in range(16):
        for i in probs[t].topk(2).indices.tolist():
            ref[t] += probs[t, i] * (F.gelu(x_TD[t] @ moe.w_in_EDH[i]) @ moe.w_out_EHD[i])
    torch.testing.assert_close(y.view(16, 16), ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(st["top1_T"], probs.argmax(-1)) and st["assign_TE"].sum(1).eq(2).all()


def test_router_logits_fp32_and_dispatch_bf16_under_autocast(monkeypatch):
    """Under bf16 autocast the router computes fp32 logits (an nn.Linear would give bf16), while the
    expert GEMMs get bf16 (the grouped kernel's fast path; the custom op is not on autocast's list,
    so MoEFFN casts)."""
    moe = mt.MoEFFN(_cfg(router="topk", balance="none"), 8)
    x = torch.randn(2, 8, 16)
    seen, logits_dtypes = [], []
    real, real_logits = mt.moe_ffn, moe.router_logits
    monkeypatch.setattr(mt, "moe_ffn", lambda x_TD, i, g, w_in, w_out, **k: seen.append(
        (x_TD.dtype, w_in.dtype, w_out.dtype)) or real(x_TD, i, g, w_in, w_out, **k))
    monkeypatch.setattr(moe, "router_logits",
                        lambda x_TD: logits_dtypes.append(real_logits(x_TD).dtype)
                        or real_logits(x_TD))
    y32, _ = moe(x, _ctx(2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = moe(x, _ctx(2, 8))
        assert moe.router(x.view(16, 16)).dtype == torch.bfloat16        # what the fp32 path avoids
    assert logits_dtypes == [torch.float32, torch.float32]
    assert seen == [(torch.float32,) * 3, (torch.bfloat16,) * 3]
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("E", [4, 8, 16])
@pytest.mark.parametrize("gate", ["learned", "uniform"])
def test_fair_reference_agreement_and_utilization_one_on_a_balanced_mix(E, gate):
    L, K, S = 8, 2, 6
    cfg = _cfg(router="reference", experts=E, top_k=K, batch_size=2 * L, reference_gate=gate)
    moe = mt.MoEFFN(cfg, L)
    dom = torch.arange(L).repeat(2)                               # balanced: 2 sequences per domain
    _, st = moe(torch.randn(2 * L, S, 16), _ctx(2 * L, S, dom))
    acc = routing.add_record({}, [st], dom.repeat_interleave(S), L, E)
    m = routing.routing_metrics(acc[0], mt.reference_groups(L, E, K)[0].numpy())
    assert m["agreement"] == 1.0 and m["utilization"] == pytest.approx(1.0)
    # K experts each
    assert m["purity"] == (1.0 if E >= L else 0.5) and st["assign_TE"].sum(1).eq(K).all()
    home = mt.reference_groups(L, E, K)[0][dom.repeat_interleave(S)]
    assert (st["top1_T"][:, None] == home).any(1).all()                      # slot 0: a home expert


def test_reference_gates_have_the_learned_routers_form():
    cfg = _cfg(router="reference", experts=8, top_k=2, batch_size=8)
    moe = mt.MoEFFN(cfg, 8)
    x = torch.randn(8, 3, 16)
    probs = moe.router(x.view(24, 16)).softmax(-1)
    idx, gates = mt.route_reference(probs, torch.arange(8).repeat_interleave(3), moe.home_LG,
                                    moe.spill_LJ, 2, False)
    assert torch.equal(idx[:, 0], torch.arange(8).repeat_interleave(3))   # G = 1: home expert d ...
    # ... and spill d + 1
    assert torch.equal(idx[:, 1], (torch.arange(8).repeat_interleave(3) + 1) % 8)
    torch.testing.assert_close(gates, probs.gather(1, idx))           # raw probabilities, like topk
    _, gates = mt.route_reference(probs, torch.zeros(24, dtype=torch.long), moe.home_LG,
                                  moe.spill_LJ, 2, True)
    assert (gates == 0.5).all()


def test_hash_router_is_a_fixed_token_map():
    moe = mt.MoEFFN(_cfg(router="hash"), 8)
    tok = torch.tensor([[5, 9, 5, 9, 200, 5, 9, 200]])
    _, st = moe(torch.randn(1, 8, 16), dict(tok_BS=tok, dom_B=torch.zeros(1, dtype=torch.long)))
    a = st["assign_TE"]
    assert torch.equal(a[0], a[2]) and torch.equal(a[1], a[3]) and torch.equal(a[4], a[7])


def test_expert_choice_matches_loop_oracle():
    torch.manual_seed(0)
    T, D, H, E, C = 12, 6, 5, 3, 4
    x, probs = torch.randn(T, D), torch.randn(T, E).softmax(-1)
    w_in, w_out = torch.randn(E, D, H), torch.randn(E, H, D)
    y, tok_EC = mt.expert_choice_ffn(x, probs, C, w_in, w_out)
    ref = torch.zeros(T, D)
    for e in range(E):
        chosen = sorted(range(T), key=lambda t: -probs[t, e].item())[:C]   # expert e's top-C tokens
        assert sorted(chosen) == sorted(tok_EC[e].tolist())
        for t in chosen:
            ref[t] += probs[t, e] * (F.gelu(x[t] @ w_in[e]) @ w_out[e])
    torch.testing.assert_close(y, ref)


# ---------------------------------------------------------------- gradient accumulation

def _doms():
    """4 tiny domains, each its own byte range (no files, no generator: milliseconds)."""
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(names=list("abcd"),
                                 train=[rng.integers(40 * d, 40 * d + 50, 3000) for d in range(4)],
                                 val=[rng.integers(40 * d, 40 * d + 50, 500) for d in range(4)])


ACC = dict(experts=4, top_k=2, n_layer=2, moe_layers="all", d_model=16, n_head=2, expert_hidden=8,
           seq_len=8, batch_size=8, warmup=2)


def _grads(cfg, aux_only=False, step=3):
    torch.manual_seed(0)
    model = mt.Model(cfg, 4)
    ce, aux, _ = mt.accumulate_grads(model, cfg, _doms(), step, CPU, aux_only=aux_only)
    return ce, aux, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accum_one_is_the_one_pass_step_bit_for_bit():
    """accum = 1: the gradient is exactly that of (ce + aux + z) on the whole batch, as before
    accumulation."""
    cfg = mt.Config(**ACC, balance="aux", balance_scope="global")
    _, _, got = _grads(cfg)
    torch.manual_seed(0)
    model = mt.Model(cfg, 4)
    x, y, dom = (torch.from_numpy(a) for a in mt.train_batch(_doms(), 8, 8, 0, 3))
    logits, stats = model(x, dom)
    ce = F.cross_entropy(logits.float().view(-1, 256), y.reshape(-1))
    (ce + sum(st["aux"] for st in stats) + sum(st["z"] for st in stats)).backward()
    for n, p in model.named_parameters():
        assert torch.equal(got[n], p.grad), n


@pytest.mark.parametrize("scope", ["global", "micro", "sequence"])
def test_accum_aux_gradient_equals_the_one_pass_computation(scope):
    """accum 4 (micro-batches of 2 sequences): the aux-loss gradient equals the one-pass gradient of
    the scope's loss on the concatenated batch. Global: f over all 8 sequences (the pre-pass);
    micro: groups of the 2 sequences of each micro-batch; sequence: unchanged. The one-pass oracle:
    accum 1 with the groups made explicit through aux_loss on the full batch."""
    cfg = mt.Config(**ACC, balance="aux", balance_scope=scope, accum=4)
    _, aux4, g4 = _grads(cfg, aux_only=True)
    torch.manual_seed(0)
    model = mt.Model(cfg, 4)
    x, _, dom = (torch.from_numpy(a) for a in mt.train_batch(_doms(), 8, 8, 0, 3))
    probs, idx = {}, {}
    real = mt.route_topk                           # capture every layer's probabilities and choices

    def spy(probs_TE, bias_E, K):
        out = real(probs_TE, bias_E, K)
        probs[len(probs)], idx[len(idx)] = probs_TE, out[0]
        return out
    mt.route_topk = spy
    try:
        counts = {0: torch.ones(1, 4), 1: torch.ones(1, 4)}
        model(x, dom, mt.StepRouting(64, lambda t: t, counts=counts))
    finally:
        mt.route_topk = real
    G = {"global": 1, "micro": 4, "sequence": 8}[scope]
    oracle = sum(slow_aux(probs[i], idx[i], G, cfg.aux_coef) for i in probs)
    _assert_oracle(model, oracle, aux4, g4)
    if scope == "global":                          # not vacuous: micro scope gives another gradient
        _, _, gm = _grads(mt.Config(**{**mt.asdict(cfg), "balance_scope": "micro"}), aux_only=True)
        assert any(not torch.allclose(gm[n], g4[n], rtol=1e-3)
                   for n in g4 if n.endswith("router.weight"))


def _assert_oracle(model, oracle, aux, grads):
    """The aux loss and every parameter's gradient equal the oracle's (built on `model`'s graph)."""
    model.zero_grad()
    oracle.backward()
    assert aux.item() == pytest.approx(oracle.item(), rel=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-9, msg=n)


def test_accum_global_equals_accum_one_on_the_same_batch():
    """The optimizer step does not depend on how it is cut into micro-batches (global scope, ce +
    aux + z)."""
    c1, a1, g1 = _grads(mt.Config(**ACC, balance="aux", balance_scope="global"))
    c4, a4, g4 = _grads(mt.Config(**ACC, balance="aux", balance_scope="global", accum=4))
    assert c4.item() == pytest.approx(c1.item(), rel=1e-6)
    assert a4.item() == pytest.approx(a1.item(), rel=1e-6)
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], rtol=1e-4, atol=1e-8, msg=n)


def test_running_scope_counts_the_micro_batches_seen_so_far():
    """--balance-scope running (Megatron-core's global_aux_loss): micro-batch m's aux loss uses the
    counts of micro-batches 1..m of the step (reset every step) with its own P. Oracle: each
    micro-batch's routing captured, then aux_loss with cumulative counts; loss and gradient."""
    cfg = mt.Config(**ACC, balance="aux", balance_scope="running", accum=4)
    _, aux4, g4 = _grads(cfg, aux_only=True)
    torch.manual_seed(0)
    model = mt.Model(cfg, 4)
    real, probs, counts = mt.route_topk, [], []

    def spy(probs_TE, bias_E, K):
        out = real(probs_TE, bias_E, K)
        probs.append(probs_TE)
        counts.append(F.one_hot(out[0].reshape(1, -1), 4).sum(1).float())
        return out
    mt.route_topk = spy
    try:
        for x, _, dom in mt.micro_batches(cfg, _doms(), 3, CPU):
            model(x, dom, mt.StepRouting(64, lambda t: t))
    finally:
        mt.route_topk = real
    n_layers = 2                                              # moe_layers="all": order m*2 + layer
    oracle = 0
    for i in range(len(probs)):
        seen = sum(counts[j] for j in range(i % n_layers, i + 1, n_layers))
        oracle = oracle + mt.aux_loss(probs[i], seen, cfg.aux_coef) / cfg.accum
    _assert_oracle(model, oracle, aux4, g4)
    _, _, gg = _grads(mt.Config(**{**mt.asdict(cfg), "balance_scope": "global"}), aux_only=True)
    assert any(not torch.allclose(gg[n], g4[n], rtol=1e-3)
               for n in g4 if n.endswith("router.weight"))
    _, _, g1r = _grads(mt.Config(**{**mt.asdict(cfg), "accum": 1}))      # one micro-batch: = global
    _, _, g1g = _grads(mt.Config(**{**mt.asdict(cfg), "accum": 1, "balance_scope": "global"}))
    assert all(torch.equal(g1r[n], g1g[n]) for n in g1g)


@pytest.mark.parametrize("scope,accum,dense,runs", [
    ("global", 2, False, True), ("global", 1, False, False), ("running", 2, False, False),
    ("micro", 2, False, False), ("global", 2, True, False)])
def test_prepass_runs_only_where_priced(monkeypatch, scope, accum, dense, runs):
    """The routing pre-pass runs for global scope with > 1 micro-batch (MoE only), and the FLOPs
    count (MFU) charges it there, one more forward: x 4/3."""
    cfg = mt.Config(**{**ACC, "moe_layers": "upper"}, balance="aux", balance_scope=scope,
                    accum=accum, dense=dense)
    calls = []
    real = mt.prepass_counts
    monkeypatch.setattr(mt, "prepass_counts", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    mt.accumulate_grads(mt.Model(cfg, 4), cfg, _doms(), 0, CPU)
    assert mt.prepass_runs(cfg) == runs == bool(calls)
    plain = cost.train_flops_per_token(cfg, prepass=False)
    assert cost.train_flops_per_token(cfg, mt.prepass_runs(cfg)) == pytest.approx(
        plain * (4 / 3 if runs else 1))


def test_global_capacity_with_accum_equals_one_pass():
    """Global capacity: queues across the micro-batches of a step drop exactly what one pass drops.
    """
    base = dict(ACC, balance="none", capacity_factor=0.5, capacity_scope="global")
    torch.manual_seed(0)
    drops = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = mt.Model(mt.Config(**base, accum=accum), 4)
        _, _, records = mt.accumulate_grads(model, mt.Config(**base, accum=accum), _doms(), 3, CPU)
        drops.append([int(sum(st[i]["n_drop"] for st, _ in records)) for i in range(2)])
    assert drops[0] == drops[1] and drops[0][0] > 0


# ---------------------------------------------------------------- end to end (tiny)

TINY = ["--experts", "4", "--n-layer", "2", "--d-model", "16", "--n-head", "2",
        "--expert-hidden", "8", "--seq-len", "16", "--batch-size", "8", "--steps", "6", "--warmup",
        "2", "--eval-seqs", "2", "--log-every", "3", "--ckpt-every", "2", "--threads", "1"]


def _data_dir(tmp_path, n_dom=3):
    d = tmp_path / "text"
    rng = np.random.default_rng(0)
    for i in range(n_dom):
        (d / f"dom{i}").mkdir(parents=True)
        alphabet = ["abcdef", "αβγδεζ", "абвгде"][i % 3]
        paras = ["".join(alphabet[j] for j in rng.integers(0, 6, 300)) for _ in range(20)]
        (d / f"dom{i}" / "a.txt").write_text("\n\n".join(paras), encoding="utf-8")
    return d


def test_smoke_main_writes_results_and_history(tmp_path, capsys):
    args = TINY + ["--accum", "2", "--out", str(tmp_path / "o"),
                   "--data-dir", str(_data_dir(tmp_path))]
    runs = mt.main(args)
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    r = res["runs"][0]
    for k in ("router", "balance", "scope", "accum", "balance_tokens", "capacity_factor", "seed",
              "val_bpb", "utilization", "maxvio", "dead_experts", "purity", "agreement", "nmi",
              "entropy", "dropped_frac", "per_domain_bpb", "routing_matrix", "tokens_per_s",
              "history"):
        assert k in r
    assert r["router"] == "topk" and r["scope"] == "global" and len(r["routing_matrix"]) == 3
    assert res["dispatch"] == dict(impl="grouped", route="native", note="")   # fp32, 16 x 8, CPU
    assert r["accum"] == 2 and r["balance_tokens"] == 8 * 16                # global: the whole step
    assert 0 < r["val_bpb"] < 9 and runs[0]["val_bpb"] == r["val_bpb"]
    assert len(r["bpb_by_position"]) == 16 and np.mean(r["bpb_by_position"]) == pytest.approx(
        r["val_bpb"], abs=1e-3)
    assert r["probe_n"] is None or r["val_bpb_after_n"] == pytest.approx(
        np.mean(r["bpb_by_position"][r["probe_n"]:]), abs=1e-3)
    assert [(h["step"], h["layer"]) for h in r["history"]] == [(3, 1), (6, 1)]
    for h in r["history"]:
        assert set(routing.HISTORY_KEYS) <= set(h)
        assert 0 < h["utilization"] <= 1 and 0 < h["entropy"] <= 1
    out = capsys.readouterr().out
    assert "domain \\ expert" in out                         # the heat map (printed via tqdm.write)
    assert out.count("expert dispatch: grouped, grouped GEMM route native") == 1   # once per run
    metrics = [json.loads(ln) for ln in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["run"], m["seed"], m["step"]) for m in metrics] == [("aux-global", 0, 3),
                                                                    ("aux-global", 0, 6)]
    for m, h in zip(metrics, r["history"]):
        assert m["bpb"] == pytest.approx(m["loss"] / math.log(2))
        assert m["bpb"] == pytest.approx(h["train_bpb"], abs=1e-4)
        assert m["lr"] == mt.lr_at(mt.parse_args(args), m["step"] - 1)
        assert m["L1_purity"] == h["purity"]
    first = (tmp_path / "o" / "results.json").read_bytes()
    ckpt = (tmp_path / "o" / "aux-global-s0" / "ckpt.pt").read_bytes()
    mt.main(args)
    # the rerun kept the first
    assert (tmp_path / "o" / "previous_1" / "results.json").read_bytes() == first
    # and its run folder
    assert (tmp_path / "o" / "previous_1" / "aux-global-s0" / "ckpt.pt").read_bytes() == ckpt
    # and added its lines
    assert len((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()) == 4


def test_domain_probe_reads_a_domain_that_is_there_and_not_one_that_is_not():
    """The probe on hand-made router inputs, windows in val_windows' order (domains interleaved),
    fed in two micro-batches: a domain direction under weaker noise -> 1.0; noise alone -> near
    chance (1/4)."""
    L, n, S, D = 4, 8, 16, 8
    vdom = np.tile(np.arange(L), n)
    wins = [np.arange(0, 16), np.arange(16, 32)]
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(len(w) * S // 4, D, generator=g) for w in wins]
    signal = [3 * F.one_hot(torch.from_numpy(vdom[w]).repeat_interleave(S // 4), D).float()
              for w in wins]
    assert routing.domain_probe([0.3 * a + b for a, b in zip(noise, signal)], wins, vdom) == 1.0
    assert routing.domain_probe(noise, wins, vdom) < 0.5
    one = np.arange(L)                                  # one window per domain: nothing to score on
    assert routing.domain_probe([torch.randn(L * S // 4, D)], [one], one) is None


def test_probe_by_position_and_n():
    """The probe at each sampled position: a domain signal only from position 8 on -> near chance
    before, 1.0 from 8; N = 8, the first position from which every later one passes 0.9."""
    L, n, S, D = 4, 8, 16, 8
    vdom = np.tile(np.arange(L), n)
    wins = [np.arange(0, 16), np.arange(16, 32)]
    g = torch.Generator().manual_seed(0)
    feats = []
    for w in wins:
        sig = 3 * F.one_hot(torch.from_numpy(vdom[w]).repeat_interleave(S // 4), D).float()
        # positions 0, 4 blind
        sig = sig * torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(len(w))[:, None]
        feats.append(sig + 0.3 * torch.randn(len(w) * S // 4, D, generator=g))
    curve = routing.probe_by_position(feats, wins, vdom, S)
    assert [p for p, _ in curve] == [0, 4, 8, 12]
    assert curve[0][1] < 0.6 and curve[1][1] < 0.6 and curve[2][1] == curve[3][1] == 1.0
    assert routing.probe_n([curve]) == 8
    assert routing.probe_n([curve, [(0, 0.95), (4, 0.8), (8, 0.91), (12, 0.99)]]) == 8  # all layers
    assert routing.probe_n([[(0, 0.95), (4, 0.5)]]) is None and routing.probe_n([None]) is None


def test_reference_steps_route_by_label_before_step_n_then_learn():
    """--reference-steps N: training forwards of steps < N route as the reference; from step N on,
    and in evaluation, as the learned top-k."""
    cfg = mt.parse_args(TINY + ["--reference-steps", "3"])
    ffn = mt.MoEFFN(cfg, n_domains=2, layer_id=1)
    probs = torch.rand(16, 4, generator=torch.Generator().manual_seed(0)).softmax(-1)
    ctx = dict(dom_B=torch.tensor([0, 1]), tok_BS=None)
    ref = mt.route_reference(probs, ctx["dom_B"].repeat_interleave(8), ffn.home_LG, ffn.spill_LJ,
                             2, False)
    top = mt.route_topk(probs, ffn.bias_E, 2)
    assert not torch.equal(ref[0], top[0])                 # so the check below can fail
    for index, training, want in [(0, True, ref), (2, True, ref), (3, True, top), (0, False, top),
                                  (None, True, top)]:
        ffn.train(training)
        got = ffn.route(probs, ctx, 8, mt.StepRouting(16, lambda t: t, index=index))
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (index, training)


def test_reference_steps_history_is_pure_until_n(tmp_path):
    args = TINY + ["--steps", "4", "--log-every", "1", "--data-dir", str(_data_dir(tmp_path))]
    run = mt.main(args + ["--reference-steps", "2", "--out", str(tmp_path / "r")])[0]
    plain = mt.main(args + ["--out", str(tmp_path / "p")])[0]
    assert run["name"] == "aux-global-ref2"
    assert [h["purity"] for h in run["history"][:2]] == [1.0, 1.0]
    assert plain["history"][0]["purity"] < 1.0 and 0 < run["domain_probe"] <= 1


@pytest.mark.parametrize("router", ["reference", "hash", "expert_choice"])
def test_smoke_other_routers(tmp_path, router):
    runs = mt.main(TINY + ["--steps", "2", "--router", router, "--out", str(tmp_path / router),
                           "--data-dir", str(_data_dir(tmp_path))])
    assert runs[0]["router"] == router and runs[0]["utilization"] > 0
    if router == "reference":
        assert runs[0]["agreement"] == 1.0


def test_sweep_jobs_two_equals_jobs_one(tmp_path):
    """--jobs 2 (spawned worker processes) gives the numbers --jobs 1 gives, run for run."""
    data = str(_data_dir(tmp_path))
    args = TINY + ["--steps", "3", "--sweep", "balance", "--batch-size", "4", "--data-dir", data]
    one = mt.main(args + ["--out", str(tmp_path / "j1")])
    two = mt.main(args + ["--out", str(tmp_path / "j2"), "--jobs", "2"])
    assert [r["name"] for r in one] == ["balance-1", "balance-2", "balance-4"]
    assert [r["balance_tokens"] for r in one] == [16, 32, 64]
    assert [r["accum"] for r in one] == [1, 2, 1]
    for a, b in zip(one, two):
        for k in ("name", "val_bpb", "per_domain_bpb", "routing_matrix", "purity", "utilization",
                  "history"):
            assert a[k] == b[k], (a["name"], k)


def test_capacity_sweep_and_bench_smoke(tmp_path):
    data = str(_data_dir(tmp_path))
    runs = mt.main(TINY + ["--steps", "2", "--sweep", "capacity", "--accum", "2",
                           "--data-dir", data, "--out", str(tmp_path / "cap")])
    assert [r["name"] for r in runs] == ["dropless", "cf1-sequence", "cf1-micro", "cf1-global",
                                         "cf1.25-sequence", "cf1.25-micro", "cf1.25-global"]
    assert runs[0]["dropped_frac"] == 0 and all(r["capacity_scope"] for r in runs[1:])
    b = mt.main(TINY + ["--bench", "--data-dir", data, "--out", str(tmp_path / "bench")])
    assert b["ratio"] > 0 and b["moe_tokens_per_s"] > 0
    assert not b["prepass"] and b["ratio_no_prepass"] is None
    b = mt.main(TINY + ["--bench", "--accum", "2", "--data-dir", data,
                        "--out", str(tmp_path / "bench2")])
    assert b["prepass"] and b["ratio_no_prepass"] > 0 and b["moe_no_prepass_step_s"] > 0
    saved = json.loads((tmp_path / "bench2" / "results.json").read_text())
    assert saved["bench"]["ratio_no_prepass"] == b["ratio_no_prepass"]
    assert saved["dispatch"]["route"] == "native"


def test_plots_when_matplotlib_is_importable(tmp_path, monkeypatch):
    """matplotlib is optional (not installed here): a stand-in module checks the plotting code runs.
    """
    from unittest import mock
    plt = mock.MagicMock()
    plt.subplots.side_effect = lambda rows=1, cols=1, **k: (
        mock.MagicMock(), [mock.MagicMock() for _ in range(cols)] if cols > 1 else mock.MagicMock())
    mpl = mock.MagicMock(pyplot=plt)
    monkeypatch.setitem(sys.modules, "matplotlib", mpl)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    hist = [dict(step=s, layer=1, purity=0.5, utilization=0.9, maxvio=0.2) for s in (1, 2)]
    runs = [dict(name=f"b{n}", seed=s, router="topk", balance="aux", balance_tokens=n, purity=0.4,
                 nmi=0.3, utilization=0.9, history=hist) for n in (1, 2, 4) for s in (0, 1)]
    paths = routing.plots(runs, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["history.png", "balance.png"]
    assert plt.close.call_count == 2


def test_resume_equals_uninterrupted_and_determinism(tmp_path):
    data = str(_data_dir(tmp_path))
    extra = ["--balance", "aux_free", "--balance-scope", "micro", "--accum", "2",
             "--data-dir", data]
    a = mt.main(TINY + extra + ["--out", str(tmp_path / "a")])[0]
    assert mt.main(TINY + extra + ["--out", str(tmp_path / "b"), "--stop-at", "3"]) is None
    assert not (tmp_path / "b" / "results.json").exists()
    b = mt.main(TINY + extra + ["--out", str(tmp_path / "b"), "--resume"])[0]
    c = mt.main(TINY + extra + ["--out", str(tmp_path / "c")])[0]
    for k in ("val_bpb", "per_domain_bpb", "routing_matrix", "purity", "utilization", "history"):
        assert a[k] == b[k] == c[k], k


def _bad(args, tmp_path, capsys):
    out = tmp_path / "bad_out"
    with pytest.raises(SystemExit) as e:
        mt.main(TINY + args + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (out / "results.json").exists()
    return err


def test_bad_inputs(tmp_path, capsys):
    assert "larger than --experts" in _bad(["--top-k", "5"], tmp_path, capsys)
    assert "must be positive" in _bad(["--d-model", "0"], tmp_path, capsys)
    assert "must be positive" in _bad(["--steps", "-3"], tmp_path, capsys)
    assert "divisible by --accum 3" in _bad(["--accum", "3"], tmp_path, capsys)
    err = _bad(["--capacity-scope", "batch"], tmp_path, capsys)
    assert "--capacity-scope: invalid choice" in err
    assert "--sweep: invalid choice" in _bad(["--sweep", "all"], tmp_path, capsys)
    assert "does not exist" in _bad(["--data-dir", str(tmp_path / "nope")], tmp_path, capsys)
    (tmp_path / "empty").mkdir()
    assert "at least 2 domain" in _bad(["--data-dir", str(tmp_path / "empty")], tmp_path, capsys)
    broken = _data_dir(tmp_path / "broken", n_dom=2)
    (broken / "dom1" / "b.txt").write_bytes(b"ok\xff\xfe not utf-8")
    assert "not valid UTF-8" in _bad(["--data-dir", str(broken)], tmp_path, capsys)
    good = _data_dir(tmp_path / "good", n_dom=2)
    err = _bad(["--data-dir", str(good), "--seq-len", "100000"], tmp_path, capsys)
    assert "longer than the data" in err
    assert "invalid int" in _bad(["--experts", "x"], tmp_path, capsys)
    # no abbreviations
    assert "unrecognized arguments: --expert " in _bad(["--expert", "4"], tmp_path, capsys)


def test_cli_bad_input_exit_code(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "moe_testbed.py"), "--top-k", "9",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


BAD = [(["--device", "cuda"], "not available"), (["--threads", "-1"], "--threads must be >= 0"),
       (["--lr", "-0.1"], "--lr must be positive"),
       (["--overlap", "1.5"], "--overlap must be in [0, 1]"),
       (["--router", "oracle"], "--router: invalid choice"),
       (["--top-k", "9"], "larger than --experts"), (["--steps", "0"], "--steps must be positive"),
       (["--expert", "4"], "unrecognized arguments"),
       (["--seeds", "0,x"], "comma-separated integers"), (["--jobs", "2.5"], "invalid int value"),
       (["--reference-steps", "-1"], "--reference-steps must be >= 0"),
       (["--router", "hash", "--reference-steps", "2"], "applies to --router topk only"),
       (["--balance", "aux_free", "--balance-scope", "running"], "--balance-scope running counts")]


@pytest.mark.parametrize("bad,msg", BAD, ids=[b[0] for b, _ in BAD])
def test_bad_input_matrix_keeps_earlier_results(tmp_path, capsys, bad, msg):
    """Each bad input: exit 2, one line, no traceback, before any work; an earlier results.json is
    untouched."""
    if bad[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text('{"runs": ["earlier"]}')
    with pytest.raises(SystemExit) as e:
        mt.main(TINY + bad + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and msg in err, err
    assert os.listdir(out) == ["results.json"]
    assert (out / "results.json").read_text() == '{"runs": ["earlier"]}'


def test_unwritable_out_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("earlier")                         # --out below a file: it cannot be created
    with pytest.raises(SystemExit) as e:
        mt.main(TINY + ["--out", str(blocker / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "cannot create it" in err
    assert blocker.read_text() == "earlier"


def test_quick_defaults_and_explicit_flags_win(tmp_path, capsys):
    q = mt.parse_args(["--quick"])
    assert all(getattr(q, k) == v for k, v in mt.QUICK.items()) and q.steps < mt.Config().steps
    q = mt.parse_args(["--quick", "--steps", "3", "--d-model", "32"])
    assert (q.steps, q.d_model, q.seq_len) == (3, 32, mt.QUICK["seq_len"])
    # the quick model on tiny data
    runs = mt.main(["--quick", "--steps", "3", "--eval-seqs", "2", "--threads", "1",
                    "--out", str(tmp_path / "q"), "--data-dir", str(_data_dir(tmp_path))])
    out = capsys.readouterr().out
    assert "purity" in out and "domain \\ expert" in out
    assert "1 run(s), 3 steps of 16x64 bytes" in out
    assert runs[0]["purity"] > 0
    assert json.loads((tmp_path / "q" / "results.json").read_text())["config"]["quick"]


def test_threads_zero_shares_the_cores_among_jobs(monkeypatch):
    """--threads 0 with --jobs N: each worker gets max(1, cores // N) threads; a given --threads is
    kept."""
    seen = []

    class Pool:                                            # records what each worker would be given
        def __init__(self, n, mp_context=None):
            seen.append(("jobs", n))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, run_fn, threads, task):      # what run_each gives its worker
            seen.append(threads)
            f = concurrent.futures.Future()
            f.set_result(None)                             # as after --stop-at: run_all stops there
            return f

    monkeypatch.setattr(run, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(run.os, "cpu_count", lambda: 8)
    for threads, jobs, want in ((0, 3, 2), (0, 16, 1), (0, 1, 8), (5, 3, 5)):
        seen.clear()
        cfg = mt.Config(threads=threads, jobs=jobs, seeds="0,1")
        assert run.worker_threads(cfg.threads, cfg.jobs) == want
        if jobs > 1:
            assert mt.run_all(cfg, [("a", cfg)], None, CPU) is None
            assert seen == [("jobs", jobs), want, want]                      # one per seed


def test_pictures_when_matplotlib_is_installed(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    mt.main(TINY + ["--steps", "2", "--out", str(tmp_path / "o"),
                    "--data-dir", str(_data_dir(tmp_path))])
    out = capsys.readouterr().out
    for name in ("history.png", "routing.png"):
        path = tmp_path / "o" / name
        assert f"wrote {path}" in out and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

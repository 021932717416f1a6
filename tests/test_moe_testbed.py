"""Tests for moe_testbed.py: metrics and losses against slow, obviously correct oracles on hand-built
routing, router behaviour, and tiny end-to-end runs (smoke, resume, determinism, bad input)."""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import moe_testbed as mt  # noqa: E402


# ---------------------------------------------------------------- metrics on hand-built routing

def test_perfect_specialization_purity_nmi_agreement_one():
    L = E = 8
    top1 = np.diag(np.full(L, 100.0))              # domain d -> expert d, always
    assign = 2 * top1
    m = mt.routing_metrics(assign, top1, 0, 1600, mt.reference_groups(L, E).numpy())
    assert m["purity"] == 1.0 and abs(m["nmi"] - 1.0) < 1e-12
    assert m["agreement"] == 1.0 and m["utilization"] == pytest.approx(1.0) and m["dead_experts"] == 0


def test_permuted_specialization_is_matched():
    perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
    top1 = np.zeros((8, 8))
    top1[np.arange(8), perm] = 50.0                  # domain d -> expert perm[d]
    agr, match = mt.agreement(top1, mt.reference_groups(8, 8).numpy())
    assert agr == 1.0 and (match[perm] == np.arange(8)).all()
    assert mt.purity(top1) == 1.0


def test_uniform_routing_u_one_nmi_zero_and_collapse():
    uniform = np.ones((8, 8))
    f = uniform.sum(0) / uniform.sum()
    assert mt.utilization(f) == pytest.approx(1.0) and mt.dead_experts(f) == 0
    assert mt.nmi(uniform) == pytest.approx(0.0, abs=1e-12)
    assert mt.purity(uniform) == pytest.approx(1 / 8)
    collapse = np.zeros((8, 8))
    collapse[:, 2] = 10.0
    f = collapse.sum(0) / collapse.sum()
    assert mt.utilization(f) == pytest.approx(1 / 8) and mt.dead_experts(f) == 7
    assert mt.nmi(collapse) == 0.0


def test_nmi_against_formula():
    rng = np.random.default_rng(0)
    M = rng.integers(0, 20, (4, 6)).astype(float)
    p = M / M.sum()
    mi = sum(p[i, j] * math.log(p[i, j] / (p[i].sum() * p[:, j].sum()))
             for i in range(4) for j in range(6) if p[i, j] > 0)
    h = lambda q: -sum(x * math.log(x) for x in q if x > 0)
    assert mt.nmi(M) == pytest.approx(mi / math.sqrt(h(p.sum(1)) * h(p.sum(0))))


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_hungarian_matches_brute_force(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        cost = rng.normal(size=(n, n))
        best = min(itertools.permutations(range(n)), key=lambda p: sum(cost[i, p[i]] for i in range(n)))
        perm = mt.hungarian(cost)
        assert sorted(perm) == list(range(n))
        assert cost[np.arange(n), perm].sum() == pytest.approx(sum(cost[i, best[i]] for i in range(n)))


# ---------------------------------------------------------------- aux loss, scopes, aux-free bias

def slow_aux(probs_BSE, idx_BSK, group_size, coef):
    """Oracle: loop over groups, count slots by hand."""
    B, S, E = probs_BSE.shape
    losses = []
    for g0 in range(0, B, group_size):
        p = probs_BSE[g0:g0 + group_size].reshape(-1, E)
        ids = idx_BSK[g0:g0 + group_size].reshape(-1).tolist()
        f = torch.tensor([ids.count(i) / len(ids) for i in range(E)])
        losses.append(coef * E * sum(f[i] * p[:, i].mean() for i in range(E)))
    return sum(losses) / len(losses)


def _routing(B=8, S=5, E=4, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, E, generator=g, requires_grad=True)
    probs = logits.softmax(-1)
    return logits, probs, probs.topk(K, -1).indices


@pytest.mark.parametrize("group_size", [1, 2, 8])
def test_aux_loss_matches_oracle(group_size):
    _, probs, idx = _routing()
    got, _ = mt.aux_loss(probs, idx, group_size, 0.01)
    assert got.item() == pytest.approx(slow_aux(probs, idx, group_size, 0.01).item(), rel=1e-6)


def test_micro_with_whole_batch_equals_global_exactly():
    logits, probs, idx = _routing()
    a, _ = mt.aux_loss(probs, idx, 8, 0.01)                                   # micro, micro-batch = B
    ga, = torch.autograd.grad(a, logits, retain_graph=True)
    b, _ = mt.aux_loss(probs, idx, 8, 0.01, reduce=mt.all_ranks_sum)           # global
    gb, = torch.autograd.grad(b, logits)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_global_loss_equals_loss_over_concatenated_parts():
    """Two 'ranks' holding half the batch each: counts summed across parts (the all-reduce), P local,
    losses (gradients) averaged as data parallelism does == global loss on the concatenated batch."""
    logits, probs, idx = _routing()
    full, _ = mt.aux_loss(probs, idx, 8, 0.01)
    g_full, = torch.autograd.grad(full, logits, retain_graph=True)
    parts = [(probs[:4], idx[:4]), (probs[4:], idx[4:])]
    total = sum(F.one_hot(i.reshape(1, -1), 4).sum(1).float() for _, i in parts)
    losses = [mt.aux_loss(p, i, 4, 0.01, reduce=lambda c: total)[0] for p, i in parts]
    mean = sum(losses) / 2
    g_parts, = torch.autograd.grad(mean, logits)
    assert mean.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(g_parts, g_full)


def test_gradient_scale_does_not_depend_on_scope():
    """If every sequence routes the same way (same f everywhere), all scopes are the same loss and gradient."""
    S, E = 6, 4
    logits = torch.randn(1, S, E).repeat(4, 1, 1).requires_grad_()
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    grads = []
    for gs in (1, 2, 4):
        loss, _ = mt.aux_loss(probs, idx, gs, 0.01)
        grads.append(torch.autograd.grad(loss, logits, retain_graph=True)[0])
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], grads[2])


def test_aux_free_bias_moves_toward_underloaded():
    bias = torch.zeros(4)
    counts = torch.tensor([[10.0, 4.0, 4.0, 2.0]])                            # expert 0 overloaded, 3 under
    mt.update_bias(bias, counts, 1e-3)
    assert bias[0] < 0 and bias[3] > 0 and bias[1] > 0
    bias2 = torch.zeros(4)                                                     # two micro groups disagreeing
    mt.update_bias(bias2, torch.tensor([[9.0, 1, 1, 1], [1, 1, 1, 9.0]]), 1e-3)
    torch.testing.assert_close(bias2, torch.tensor([0.0, 1e-3, 1e-3, 0.0]))


# ---------------------------------------------------------------- routers

def _cfg(**kw):
    base = dict(experts=4, top_k=2, n_layer=2, d_model=16, n_head=2, expert_hidden=8, seq_len=8, batch_size=4,
                steps=6, warmup=2, eval_seqs=2, log_every=3, ckpt_every=2)
    base.update(kw)
    return mt.Config(**base)


def test_capacity_drop_count():
    cfg = _cfg(router="topk", balance="aux_free", capacity_factor=1.0, batch_size=2)
    moe = mt.MoEFFN(cfg, 8)
    torch.nn.init.zeros_(moe.router.weight)                                   # equal probs: the bias decides
    moe.bias_E.copy_(torch.tensor([1.0, 0.5, 0.0, 0.0]))                       # everyone picks experts 0 and 1
    x = torch.randn(2, 8, 16)                                                  # T = 16, K = 2, E = 4
    y, st = moe(x, dict(tok_BS=torch.zeros(2, 8, dtype=torch.long), dom_B=torch.zeros(2, dtype=torch.long)))
    # C = ceil(1.0 * 16 * 2 / 4) = 8 slots per expert; 16 tokens want expert 0 and 16 want expert 1
    assert st["n_slots"] == 32 and st["n_drop"] == 16
    # priority is token order: the last 8 tokens lost both experts and output exactly zero
    assert torch.all(y.view(16, 16)[8:] == 0) and torch.all(y.view(16, 16)[:8] != 0)


def test_topk_output_uses_raw_probabilities_as_gates():
    """y_t = sum_{i in top-k} p_ti * E_i(h_t), p = softmax over ALL experts (not renormalised): loop oracle."""
    cfg = _cfg(router="topk", balance="none")
    moe = mt.MoEFFN(cfg, 8)
    x = torch.randn(2, 8, 16)
    y, st = moe(x, dict(tok_BS=torch.zeros(2, 8, dtype=torch.long), dom_B=torch.zeros(2, dtype=torch.long)))
    x_TD = x.view(16, 16)
    probs = moe.router(x_TD).softmax(-1)
    ref = torch.zeros(16, 16)
    for t in range(16):
        for i in probs[t].topk(2).indices.tolist():
            ref[t] += probs[t, i] * (F.gelu(x_TD[t] @ moe.w_in_EDH[i]) @ moe.w_out_EHD[i])
    torch.testing.assert_close(y.view(16, 16), ref, rtol=1e-4, atol=1e-6)
    assert torch.equal(st["top1_T"], probs.argmax(-1)) and st["assign_TE"].sum(1).eq(2).all()


def test_bf16_autocast_hands_the_dispatch_bf16(monkeypatch):
    """Under autocast the expert GEMMs must run in bf16 (the grouped kernel's fast path), as a Linear would;
    the custom op is not on autocast's list, so MoEFFN casts. Output close to the fp32 layer."""
    cfg = _cfg(router="topk", balance="none")
    moe = mt.MoEFFN(cfg, 8)
    x = torch.randn(2, 8, 16)
    ctx = dict(tok_BS=torch.zeros(2, 8, dtype=torch.long), dom_B=torch.zeros(2, dtype=torch.long))
    seen = []
    real = mt.moe_ffn
    monkeypatch.setattr(mt, "moe_ffn", lambda x_TD, i, g, w_in, w_out, **k: seen.append(
        (x_TD.dtype, w_in.dtype, w_out.dtype)) or real(x_TD, i, g, w_in, w_out, **k))
    y32, _ = moe(x, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = moe(x, ctx)
    assert seen == [(torch.float32,) * 3, (torch.bfloat16,) * 3]
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("E,expect", [(8, list(range(8))), (16, [0, 2, 4, 6, 8, 10, 12, 14]),
                                      (4, [0, 0, 1, 1, 2, 2, 3, 3])])
def test_reference_router_assignment(E, expect):
    cfg = _cfg(router="reference", experts=E, top_k=2, batch_size=8)
    moe = mt.MoEFFN(cfg, 8)
    dom = torch.arange(8)
    _, st = moe(torch.randn(8, 3, 16), dict(tok_BS=torch.zeros(8, 3, dtype=torch.long), dom_B=dom))
    a = st["assign_TE"].view(8, 3, E)
    G = max(1, E // 8)
    for d in range(8):
        used = a[d].sum(0).nonzero().flatten().tolist()
        assert used == list(range(expect[d], expect[d] + G))        # only its group, all of its group (K >= G)


def test_hash_router_is_a_fixed_token_map():
    cfg = _cfg(router="hash")
    moe = mt.MoEFFN(cfg, 8)
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
        chosen = sorted(range(T), key=lambda t: -probs[t, e].item())[:C]     # expert e's top-C tokens
        assert sorted(chosen) == sorted(tok_EC[e].tolist())
        for t in chosen:
            ref[t] += probs[t, e] * (F.gelu(x[t] @ w_in[e]) @ w_out[e])
    torch.testing.assert_close(y, ref)


# ---------------------------------------------------------------- end to end (tiny)

TINY = ["--experts", "4", "--n-layer", "2", "--d-model", "16", "--n-head", "2", "--expert-hidden", "8",
        "--seq-len", "16", "--batch-size", "8", "--steps", "6", "--warmup", "2", "--eval-seqs", "2",
        "--log-every", "3", "--ckpt-every", "2", "--threads", "1"]


def _data_dir(tmp_path, n_dom=3):
    d = tmp_path / "text"
    rng = np.random.default_rng(0)
    for i in range(n_dom):
        (d / f"dom{i}").mkdir(parents=True)
        alphabet = ["abcdef", "αβγδεζ", "абвгде"][i % 3]
        paras = ["".join(alphabet[j] for j in rng.integers(0, 6, 300)) for _ in range(20)]
        (d / f"dom{i}" / "a.txt").write_text("\n\n".join(paras), encoding="utf-8")
    return d


def test_smoke_main_writes_results(tmp_path, capsys):
    runs = mt.main(TINY + ["--out", str(tmp_path / "o"), "--data-dir", str(_data_dir(tmp_path))])
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    r = res["runs"][0]
    for k in ("router", "balance", "scope", "capacity_factor", "seed", "val_bpb", "utilization", "dead_experts",
              "purity", "agreement", "nmi", "dropped_frac", "per_domain_bpb", "routing_matrix", "tokens_per_s"):
        assert k in r
    assert r["router"] == "topk" and r["scope"] == "global" and len(r["routing_matrix"]) == 3
    assert 0 < r["val_bpb"] < 9 and runs[0]["val_bpb"] == r["val_bpb"]
    assert "domain \\ expert" in capsys.readouterr().out        # the heat map (printed via tqdm.write)


@pytest.mark.parametrize("router", ["reference", "hash", "expert_choice"])
def test_smoke_other_routers(tmp_path, router):
    runs = mt.main(TINY + ["--steps", "2", "--router", router, "--out", str(tmp_path / router),
                           "--data-dir", str(_data_dir(tmp_path))])
    assert runs[0]["router"] == router and runs[0]["utilization"] > 0
    if router == "reference":
        assert runs[0]["agreement"] == 1.0


def test_resume_equals_uninterrupted_and_determinism(tmp_path):
    data = str(_data_dir(tmp_path))
    extra = ["--balance", "aux_free", "--balance-scope", "micro", "--micro-batch", "2", "--data-dir", data]
    a = mt.main(TINY + extra + ["--out", str(tmp_path / "a")])[0]
    assert mt.main(TINY + extra + ["--out", str(tmp_path / "b"), "--stop-at", "3"]) is None
    assert not (tmp_path / "b" / "results.json").exists()
    b = mt.main(TINY + extra + ["--out", str(tmp_path / "b"), "--resume"])[0]
    c = mt.main(TINY + extra + ["--out", str(tmp_path / "c")])[0]
    for k in ("val_bpb", "per_domain_bpb", "routing_matrix", "purity", "utilization"):
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
    assert "does not exist" in _bad(["--data-dir", str(tmp_path / "nope")], tmp_path, capsys)
    (tmp_path / "empty").mkdir()
    assert "at least 2 domain" in _bad(["--data-dir", str(tmp_path / "empty")], tmp_path, capsys)
    one = _data_dir(tmp_path / "one", n_dom=1)
    assert "at least 2 domain" in _bad(["--data-dir", str(one)], tmp_path, capsys)
    broken = _data_dir(tmp_path / "broken", n_dom=2)
    (broken / "dom1" / "b.txt").write_bytes(b"ok\xff\xfe not utf-8")
    assert "not valid UTF-8" in _bad(["--data-dir", str(broken)], tmp_path, capsys)
    good = _data_dir(tmp_path / "good", n_dom=2)
    assert "longer than the data" in _bad(["--data-dir", str(good), "--seq-len", "100000"], tmp_path, capsys)
    assert "invalid int" in _bad(["--experts", "x"], tmp_path, capsys)


def test_cli_bad_input_exit_code(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "moe_testbed.py"), "--top-k", "9", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()

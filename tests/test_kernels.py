"""kernels.moe_ffn against a per-(token, slot) oracle: outputs and all four gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import moe_ffn


def oracle(x, idx, gates, w_in, w_out, capacity_factor=0.0):
    """y_t = sum_k g_tk * gelu(x_t @ w_in[e]) @ w_out[e], one (token, slot) at a time.
    With capacity_factor > 0: walk the assignments in token order (t*K + k); an expert that already
    holds C = ceil(cf*T*K/E) assignments drops the rest."""
    T, K = idx.shape
    E = w_in.shape[0]
    C = max(1, math.ceil(capacity_factor * T * K / E)) if capacity_factor > 0 else T * K
    taken = [0] * E
    dropped = torch.zeros(T, K, dtype=torch.bool)
    rows = []
    for t in range(T):
        y_t = torch.zeros_like(x[t])
        for k in range(K):
            e = int(idx[t, k])
            if taken[e] >= C:
                dropped[t, k] = True
                continue
            taken[e] += 1
            y_t = y_t + gates[t, k] * (F.gelu(x[t] @ w_in[e]) @ w_out[e])
        rows.append(y_t)
    return torch.stack(rows), dropped


def make(T, D, H, E, K, dtype=torch.float64, seed=0, idx=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    if idx is None:
        idx = torch.randn(T, E, generator=g).topk(K, dim=-1).indices
    gates = torch.rand(T, K, generator=g, dtype=dtype) * 1.7     # deliberately not summing to 1
    w_in = torch.randn(E, D, H, generator=g, dtype=dtype) / D ** 0.5
    w_out = torch.randn(E, H, D, generator=g, dtype=dtype) / H ** 0.5
    grad_y = torch.randn(T, D, generator=g, dtype=dtype)         # random upstream gradient
    return x, idx, gates, w_in, w_out, grad_y


def value_and_grads(fn, x, idx, gates, w_in, w_out, grad_y, **kw):
    leaves = [t.clone().requires_grad_() for t in (x, gates, w_in, w_out)]
    y, dropped = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3], **kw)
    grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    grads = [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]
    return [y.detach()] + list(grads), dropped


def assert_matches(got, want, atol, rtol):
    for name, a, b in zip(("y", "dx", "dgates", "dw_in", "dw_out"), got, want):
        torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# float64 goes through the always-correct per-group path of the grouped GEMM; D = 12 is not a power of two
SHAPES = [(T, E, K) for T in (1, 7, 64) for E in (1, 4, 8) for K in sorted({1, 2, E}) if K <= E]


@pytest.mark.parametrize("impl", ["loop", "grouped", "capacity"])
@pytest.mark.parametrize("T,E,K", SHAPES)
def test_matches_oracle_float64(impl, T, E, K):
    args = make(T, 12, 20, E, K)
    want, _ = value_and_grads(oracle, *args)
    got, dropped = value_and_grads(moe_ffn, *args, impl=impl, capacity_factor=float(E))  # cf = E: never drops
    assert_matches(got, want, atol=1e-10, rtol=1e-10)
    assert not dropped.any()


@pytest.mark.parametrize("D,H", [(12, 20), (6, 10)])   # (12, 20): native torch._grouped_mm rows; (6, 10): fallback
def test_grouped_float32(D, H):
    args = make(64, D, H, 4, 2, dtype=torch.float32)
    want, _ = value_and_grads(oracle, *[a.double() if a.is_floating_point() else a for a in args])
    got, _ = value_and_grads(moe_ffn, *args, impl="grouped")
    assert_matches(got, want, atol=1e-4, rtol=1e-4)


def test_native_grouped_mm_is_used_when_it_applies(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, idx, gates, w_in, w_out, grad_y = make(32, 16, 32, 4, 2, dtype=torch.float32)
    x.requires_grad_()
    moe_ffn(x, idx, gates, w_in, w_out, impl="grouped")[0].backward(grad_y)
    assert len(calls) == 4    # two forward GEMMs, two input-gradient GEMMs


@pytest.mark.parametrize("impl", ["loop", "grouped", "capacity"])
@pytest.mark.parametrize("case", ["empty_expert", "all_on_one", "tied_scores", "repeated_expert"])
def test_edge_routings(impl, case):
    T, D, H, E, K = 16, 12, 20, 4, 2
    if case == "empty_expert":           # expert 3 gets nothing
        idx = torch.stack([torch.arange(T) % 3, (torch.arange(T) + 1) % 3], 1)
    elif case == "all_on_one":           # every token's top-1 is expert 2, top-2 is expert 0
        idx = torch.tensor([[2, 0]] * T)
    elif case == "tied_scores":          # all router scores equal: whatever topk picks must work
        idx = torch.zeros(T, E).topk(K, dim=-1).indices
    else:                                # the same expert in both slots of a token
        idx = torch.tensor([[1, 1]] * T)
    args = make(T, D, H, E, K, idx=idx)
    want, _ = value_and_grads(oracle, *args)
    got, _ = value_and_grads(moe_ffn, *args, impl=impl, capacity_factor=float(E))
    assert_matches(got, want, atol=1e-10, rtol=1e-10)
    if case == "empty_expert":
        assert got[3][3].abs().max() == 0 and got[4][3].abs().max() == 0   # no gradient to the idle expert


@pytest.mark.parametrize("T,E,K,cf", [(64, 4, 2, 1.0), (64, 8, 2, 0.5), (7, 4, 4, 0.3), (33, 8, 8, 1.0)])
def test_capacity_drops_like_oracle(T, E, K, cf):
    # skewed routing so that some experts overflow
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(T, E, generator=g) + torch.linspace(2, 0, E)
    args = make(T, 12, 20, E, K, idx=scores.topk(K, dim=-1).indices)
    want, want_dropped = value_and_grads(oracle, *args, capacity_factor=cf)
    got, dropped = value_and_grads(moe_ffn, *args, impl="capacity", capacity_factor=cf)
    assert torch.equal(dropped, want_dropped)
    C = kernels.capacity(T, K, E, cf)
    kept_per_expert = torch.bincount(args[1][~dropped], minlength=E)
    assert kept_per_expert.max() <= C
    if cf < 1:
        assert dropped.any()
    assert_matches(got, want, atol=1e-10, rtol=1e-10)


def test_compiled_equals_eager_and_does_not_recompile():
    torch._dynamo.reset()
    T, D, H, E, K = 32, 16, 32, 4, 2
    args = make(T, D, H, E, K, dtype=torch.float32)
    eager, _ = value_and_grads(moe_ffn, *args, impl="grouped")
    compiled, _ = value_and_grads(moe_ffn, *args, impl="grouped", compile=True)
    assert_matches(compiled, eager, atol=1e-5, rtol=1e-5)
    # a different routing pattern (and a different per-expert load) reuses the same graph
    other = list(args)
    other[1] = torch.tensor([[0, 1]] * (T - 1) + [[3, 2]])
    with torch._dynamo.config.patch(error_on_recompile=True):
        again, _ = value_and_grads(moe_ffn, *other, impl="grouped", compile=True)
    want, _ = value_and_grads(moe_ffn, *other, impl="grouped")
    assert_matches(again, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,word", [
    (lambda a: a.update(idx=a["idx"] + 10), "expert_idx_TK"),               # ids out of range
    (lambda a: a.update(idx=a["idx"] - 10), "expert_idx_TK"),
    (lambda a: a.update(idx=torch.zeros(8, 5, dtype=torch.long), gates=torch.rand(8, 5)), "top-k"),  # K > E
    (lambda a: a.update(x=a["x"][:, :5]), "w_in"),                            # D mismatch
    (lambda a: a.update(w_out=a["w_out"][:, :3]), "w_out"),
    (lambda a: a.update(gates=a["gates"][:4]), "gates_TK"),
    (lambda a: a.update(idx=a["idx"][:4]), "expert_idx_TK"),
    (lambda a: a.update(x=a["x"].long()), "x_TD"),                            # not floating
    (lambda a: a.update(idx=a["idx"].float()), "expert_idx_TK"),
    (lambda a: a.update(x=a["x"][None]), "x_TD"),
    (lambda a: a.update(impl="magic"), "impl"),
    (lambda a: a.update(impl="capacity", capacity_factor=0.0), "capacity_factor"),
])
def test_bad_input_raises_value_error(change, word):
    x, idx, gates, w_in, w_out, _ = make(8, 12, 20, 4, 2)
    a = dict(x=x, idx=idx, gates=gates, w_in=w_in, w_out=w_out, impl="grouped", capacity_factor=1.0)
    change(a)
    with pytest.raises(ValueError, match=word):
        moe_ffn(a["x"], a["idx"], a["gates"], a["w_in"], a["w_out"], impl=a["impl"],
                capacity_factor=a["capacity_factor"])

"""kernels.moe_ffn against a per-(token, slot) oracle: outputs and all four gradients. Also: the
native grouped GEMM in fp32 and bf16 (forward and both gradients, eager and compiled), the route
chosen by device capability (and a GPU's routes run on the CPU), no host reads or atomics in
"grouped", bit-for-bit repeatability, the whole MoE layer of moe_testbed.py compiled with
fullgraph=True, and kernels.bench refusing to time a wrong implementation (and passing its checks
on a GPU's routes)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import kernels.bench as bench
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


NAMES = ("y", "dx", "dgates", "dw_in", "dw_out")


def assert_matches(got, want, atol, rtol):
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b.to(a.dtype), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


def assert_rel_close(got, want, tol):
    """Norm-wise relative error ||got - want|| / ||want|| <= tol, output and every gradient."""
    for name, a, b in zip(NAMES, got, want):
        err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol}"


def as_double(args):
    return [a.double() if a.is_floating_point() else a for a in args]


class OpLog(TorchDispatchMode):
    """Records every aten op (with its arguments' dtypes) that runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func.overloadpacket), func, args, kwargs))
        return func(*args, **kwargs)

    def names(self):
        return [n for n, *_ in self.ops]


def no_loop(monkeypatch):
    """Make the per-group fallback of the grouped GEMM fail loudly if anything reaches it."""
    def boom(*a, **k):
        raise AssertionError("the per-group loop ran")
    monkeypatch.setattr(kernels, "_grouped_mm_loop", boom)
    monkeypatch.setattr(kernels, "_grouped_wgrad_loop", boom)


# float64 goes through the always-correct per-group path of the grouped GEMM; D = 12 is not a power
# of two
SHAPES = [(T, E, K) for T in (1, 7, 64) for E in (1, 4, 8) for K in sorted({1, 2, E}) if K <= E]


@pytest.mark.parametrize("impl", ["loop", "grouped", "capacity"])
@pytest.mark.parametrize("T,E,K", SHAPES)
def test_matches_oracle_float64(impl, T, E, K):
    args = make(T, 12, 20, E, K)
    want, _ = value_and_grads(oracle, *args)
    # cf = E: never drops
    got, dropped = value_and_grads(moe_ffn, *args, impl=impl, capacity_factor=float(E))
    assert_matches(got, want, atol=1e-10, rtol=1e-10)
    assert not dropped.any()


# (12, 20): native torch._grouped_mm rows; (6, 10): fallback
@pytest.mark.parametrize("D,H", [(12, 20), (6, 10)])
def test_grouped_float32(D, H):
    args = make(64, D, H, 4, 2, dtype=torch.float32)
    want, _ = value_and_grads(oracle, *[a.double() if a.is_floating_point() else a for a in args])
    got, _ = value_and_grads(moe_ffn, *args, impl="grouped")
    assert_matches(got, want, atol=1e-4, rtol=1e-4)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}   # norm-wise, against the float64 oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_native_grouped_gemm_forward_and_both_gradients(dtype, compiled, monkeypatch):
    """fp32 and bf16 on CPU take torch._grouped_mm for the two forward GEMMs and the four gradient
    GEMMs (eager: torch's own autograd; compiled fp32: inside the custom op) -- never the per-group
    loop."""
    no_loop(monkeypatch)
    args = make(32, 16, 32, 4, 2, dtype=dtype)          # compiled: the graph the next tests reuse
    want, _ = value_and_grads(oracle, *as_double(args))
    if compiled:              # (torch.compile does not trace under a Python dispatch mode)
        got, _ = value_and_grads(moe_ffn, *args, impl="grouped", compile=True)
    else:
        with OpLog() as log:
            got, _ = value_and_grads(moe_ffn, *args, impl="grouped")
    assert_rel_close(got, want, TOL[dtype])
    if not compiled:
        gemms = [a for n, f, a, k in log.ops if n == "aten._grouped_mm"]
        # 2 forward, 2 input-gradient, 2 weight-gradient
        assert len(gemms) == 6
        # the 2D x 2D weight gradients
        assert sum(a[0].dim() == 2 and a[1].dim() == 2 for a in gemms) == 2
        assert all(a[0].dtype == dtype for a in gemms)


# aten ops that read a tensor's value on the host: on CUDA each one waits for the GPU
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount",
              "aten._unique2", "aten.unique_consecutive", "aten.unique_dim",
              "aten.repeat_interleave"}
# accumulating scatters: atomic adds on CUDA, so their sums are not repeatable there
ATOMICS = {"aten.index_add", "aten.index_add_", "aten.scatter_add", "aten.scatter_add_",
           "aten.put_", "aten.index_put", "aten.index_put_", "aten._index_put_impl_",
           "aten.scatter_reduce", "aten.index_reduce"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_has_no_host_reads_and_no_atomics(dtype):
    args = make(64, 16, 32, 8, 2, dtype=dtype)
    with OpLog() as log:
        value_and_grads(moe_ffn, *args, impl="grouped")
    assert not HOST_READS & set(log.names()) and not ATOMICS & set(log.names())
    # the capacity path: no host reads either
    with OpLog() as log:
        value_and_grads(moe_ffn, *args, impl="capacity", capacity_factor=1.0)
    assert not HOST_READS & set(log.names())
    with OpLog() as log:                                    # the probe sees them: the loop has both
        value_and_grads(moe_ffn, *args, impl="loop")
    assert HOST_READS & set(log.names()) and ATOMICS & set(log.names())
    # and debug=True's id check reads on the host
    with OpLog() as log:
        moe_ffn(*args[:5], impl="grouped", debug=True)
    assert "aten._local_scalar_dense" in log.names()


@pytest.mark.parametrize("impl,compiled",
                         [("grouped", False), ("grouped", True), ("capacity", False)])
def test_bit_for_bit_repeatable(impl, compiled):
    """Same inputs, same bits: output and all four gradients over several calls (no atomics)."""
    args = make(32, 16, 32, 4, 2, dtype=torch.float32, seed=3)
    runs = [value_and_grads(moe_ffn, *args, impl=impl, capacity_factor=1.0, compile=compiled)[0]
            for _ in range(3)]
    for other in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], other):
            assert torch.equal(a, b), name


# float32: torch._grouped_mm's route
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("impl", ["loop", "grouped", "capacity"])
@pytest.mark.parametrize("case", ["empty_expert", "all_on_one", "tied_scores", "repeated_expert"])
def test_edge_routings(impl, case, dtype):
    T, D, H, E, K = 16, 12, 20, 4, 2
    if case == "empty_expert":           # expert 3 gets nothing
        idx = torch.stack([torch.arange(T) % 3, (torch.arange(T) + 1) % 3], 1)
    elif case == "all_on_one":           # every token's top-1 is expert 2, top-2 is expert 0
        idx = torch.tensor([[2, 0]] * T)
    elif case == "tied_scores":          # all router scores equal: whatever topk picks must work
        idx = torch.zeros(T, E).topk(K, dim=-1).indices
    else:                                # the same expert in both slots of a token
        idx = torch.tensor([[1, 1]] * T)
    args = make(T, D, H, E, K, idx=idx, dtype=dtype)
    want, _ = value_and_grads(oracle, *as_double(args))
    got, _ = value_and_grads(moe_ffn, *args, impl=impl, capacity_factor=float(E))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_matches(got, want, atol=tol, rtol=tol)
    if case == "empty_expert":
        # no gradient to the idle expert
        assert got[3][3].abs().max() == 0 and got[4][3].abs().max() == 0


@pytest.mark.parametrize("T,E,K,cf",
                         [(64, 4, 2, 1.0), (64, 8, 2, 0.5), (7, 4, 4, 0.3), (33, 8, 8, 1.0)])
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
    (lambda a: a.update(idx=a["idx"] + 10, debug=True), "expert_idx_TK"),  # ids out of range
    (lambda a: a.update(idx=a["idx"] - 10, debug=True), "expert_idx_TK"),
    # K > E
    (lambda a: a.update(idx=torch.zeros(8, 5, dtype=torch.long), gates=torch.rand(8, 5)), "top-k"),
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
    a = dict(x=x, idx=idx, gates=gates, w_in=w_in, w_out=w_out, impl="grouped", capacity_factor=1.0,
             debug=False)
    change(a)
    with pytest.raises(ValueError, match=word):
        moe_ffn(a["x"], a["idx"], a["gates"], a["w_in"], a["w_out"], impl=a["impl"],
                capacity_factor=a["capacity_factor"], debug=a["debug"])


@pytest.mark.parametrize("impl", ["loop", "grouped", "capacity"])
@pytest.mark.parametrize("shift", [10, -10])
def test_out_of_range_ids_trip_the_device_assert(impl, shift):
    """Without debug there is no host read, but a bad id still fails (RuntimeError from the
    on-device assert; on CUDA it fires asynchronously) instead of being silently skipped."""
    x, idx, gates, w_in, w_out, _ = make(8, 12, 20, 4, 2)
    with pytest.raises(RuntimeError, match="expert_idx_TK"):
        moe_ffn(x, idx + shift, gates, w_in, w_out, impl=impl, capacity_factor=1.0)


ROUTES = [   # (device type, capability, dtype, aligned) -> route
    (("cuda", (9, 0), torch.bfloat16, True), "native"),     # Hopper, bf16, aligned: the fast path
    (("cuda", (9, 0), torch.float32, True), "loop"),        # fp32 stays fp32, never bf16 unasked
    (("cuda", (9, 0), torch.bfloat16, False), "loop"),      # unaligned rows
    (("cuda", (8, 0), torch.bfloat16, True), "loop"),       # Ampere: no grouped kernel
    (("cuda", (8, 9), torch.bfloat16, True), "loop"),
    (("cuda", (10, 0), torch.bfloat16, True), "loop"),      # sm100: pytorch/pytorch#172439
    (("cuda", (10, 3), torch.bfloat16, True), "loop"),      # sm103: pytorch/pytorch#193633
    (("cuda", (12, 0), torch.bfloat16, True), "loop"),
    (("cuda", None, torch.bfloat16, True), "loop"),
    (("cpu", None, torch.float32, True), "native"),         # the CPU as measured in docs/kernels.md
    (("cpu", None, torch.bfloat16, True), "native"),
    (("cpu", None, torch.float64, True), "loop"),
    (("cpu", None, torch.float32, False), "loop"),
    (("mps", None, torch.bfloat16, True), "loop"),
]


@pytest.mark.parametrize("args,route", ROUTES, ids=["-".join(map(str, a)) for a, _ in ROUTES])
def test_grouped_route_by_capability(args, route):
    assert kernels.grouped_route(*args) == route


def test_dispatch_route_names_the_route_of_moe_ffn():
    assert kernels.dispatch_route("cpu", torch.float32, 16, 32) == "native"
    assert kernels.dispatch_route("cpu", torch.bfloat16, 12, 32) == "loop"     # 24-byte rows
    assert kernels.dispatch_route("cpu", torch.float32, 12, 32) == "native"    # 48-byte rows
    assert kernels.dispatch_route("cpu", torch.float64, 16, 32) == "loop"


def pretend_gpu(monkeypatch, capability):
    """CPU tensors take the route a CUDA device of this capability would (kernels._device_of)."""
    monkeypatch.setattr(kernels, "_device_of", lambda device: ("cuda", capability))


def count_loops(monkeypatch):
    """Count the fallback's per-group loops: each reads the group ends on the host once (a CUDA
    sync)."""
    calls = []
    for name in ("_grouped_mm_loop", "_grouped_wgrad_loop"):
        def wrapped(*a, _f=getattr(kernels, name), **k):
            calls.append(1)
            return _f(*a, **k)
        monkeypatch.setattr(kernels, name, wrapped)
    return calls


@pytest.mark.parametrize("capability,dtype,want", [((9, 0), torch.float32, "loop"),
                                                   ((9, 0), torch.bfloat16, "native"),
                                                   ((10, 0), torch.bfloat16, "loop"),
                                                   ((10, 3), torch.bfloat16, "loop")])
def test_routes_of_a_gpu_run_on_the_cpu(monkeypatch, capability, dtype, want):
    """moe_ffn on CPU tensors with the routes of a pretend GPU: fp32 on Hopper is computed in fp32
    (all GEMMs fp32, float64 oracle within 1e-5); Blackwell takes the loop; the loop runs once per
    grouped GEMM, 6 times per forward + backward (the 6 host syncs per MoE layer of the docs)."""
    pretend_gpu(monkeypatch, capability)
    loops = count_loops(monkeypatch)
    args = make(32, 16, 32, 4, 2, dtype=dtype)
    want_vals, _ = value_and_grads(oracle, *as_double(args))
    with OpLog() as log:
        got, _ = value_and_grads(moe_ffn, *args, impl="grouped")
    gemms = [a for n, f, a, k in log.ops if n == "aten._grouped_mm"]
    assert all(g.dtype == dtype for g in got)
    assert_rel_close(got, want_vals, TOL[dtype])
    if want == "native":
        assert len(gemms) == 6 and not loops
    else:
        assert not gemms and len(loops) == 6
        assert all(a[0].dtype == dtype for n, f, a, k in log.ops if n in ("aten.mm", "aten.matmul"))


# ---------------------------------------------------------- the whole MoE layer of moe_testbed.py

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_compiles_as_one_graph(dtype):
    """Router, dispatch, combine, aux and z losses and the drop count: torch.compile(fullgraph=True)
    of the layer's forward and backward, equal to eager, and a new routing pattern reuses the graph.
    A host read anywhere in the layer (.item(), int(tensor), .tolist(), nonzero) would break the
    graph and fail this. The graph stops after autograd's tracing (aot_eager): Inductor's code for
    the dispatch is tested above."""
    import moe_testbed as mt
    torch._dynamo.reset()
    cfg = mt.Config(experts=4, top_k=2, n_layer=2, d_model=16, n_head=2, expert_hidden=16,
                    seq_len=8, batch_size=4, router="topk", balance="aux", balance_scope="global")
    torch.manual_seed(0)
    layer = mt.MoEFFN(cfg, 8)
    ctx = dict(tok_BS=torch.zeros(4, 8, dtype=torch.long), dom_B=torch.arange(4))
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(4, 8, 16, generator=g)

    def step(fn, x):
        x = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y, st = fn(x, ctx)
        loss = (y.float() * grad_y).sum() + st["aux"] + st["z"]
        grads = torch.autograd.grad(loss, [x, layer.router.weight, layer.w_in_EDH, layer.w_out_EHD])
        return [y.float().detach(), st["aux"].detach(), st["z"].detach(),
                st["n_drop"]] + list(grads)

    x = torch.randn(4, 8, 16, generator=g)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    want, got = step(layer, x), step(compiled, x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    names = ("y", "aux", "z", "n_drop", "dx", "drouter", "dw_in", "dw_out")
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    with torch._dynamo.config.patch(error_on_recompile=True):
        x2 = torch.randn(4, 8, 16, generator=g) * 3
        again = step(compiled, x2)
    torch.testing.assert_close(again[0], step(layer, x2)[0], rtol=tol, atol=tol)
    torch._dynamo.reset()


# ------------------------------------------------------------- kernels.bench checks before it times

def _tiny_bench(monkeypatch, tmp_path, capsys, dtypes="fp32"):
    monkeypatch.setitem(bench.SHAPES, "a", (64, 16, 32, 4, 2))
    monkeypatch.setattr(bench, "interleaved_ms",
                        lambda fns, device, **kw: {k: f(0) or 1.0 for k, f in fns.items()})
    out = tmp_path / "bench.json"
    code = 0
    try:
        bench.main(["--quick", "--no-compile", "--dtypes", dtypes, "--json", str(out)])
    except SystemExit as e:
        code = e.code
    return code, json.loads(out.read_text()), capsys.readouterr().out


def test_bench_times_correct_implementations(monkeypatch, tmp_path, capsys):
    code, rows, text = _tiny_bench(monkeypatch, tmp_path, capsys, dtypes="fp32,bf16")
    assert code == 0 and "REFUSED" not in text
    assert {r["impl"] for r in rows} == {"dense", "loop", "grouped", "capacity"}
    assert all(r["ms"] == 1.0 for r in rows)
    keys = {"shape", "impl", "compiled", "dtype", "pass", "ms", "speedup_vs_loop", "frac_of_dense"}
    # the JSON keys kernels.bench has always written
    assert all(set(r) == keys for r in rows)


# right output, no gradient to the gates
def _wrong_gate_gradient(x, idx, gates, w_in, w_out, cf):
    return kernels._moe_grouped(x, idx, gates.detach(), w_in, w_out, cf)


# 5% too large: past bf16's tolerance too
def _wrong_output(x, idx, gates, w_in, w_out, cf):
    y, dropped = kernels._moe_grouped(x, idx, gates, w_in, w_out, cf)
    return y * 1.05, dropped


# a smaller capacity than it was asked for
def _wrong_drops(x, idx, gates, w_in, w_out, cf):
    return kernels._moe_capacity(x, idx, gates, w_in, w_out, cf * 0.7)


@pytest.mark.parametrize("impl,wrong", [("grouped", _wrong_gate_gradient),
                                        ("grouped", _wrong_output), ("capacity", _wrong_drops)])
def test_bench_refuses_to_time_a_wrong_implementation(monkeypatch, tmp_path, capsys, impl, wrong):
    monkeypatch.setitem(kernels._IMPL_FNS, impl, wrong)
    code, rows, text = _tiny_bench(monkeypatch, tmp_path, capsys)
    assert code == 1 and "REFUSED" in text and "refused to time" in text
    bad = [r for r in rows if r["impl"] == impl]
    assert bad and all(r["ms"] is None and r["speedup_vs_loop"] is None for r in bad)
    assert all(r["ms"] == 1.0 for r in rows if r["impl"] != impl)    # the others are still timed


@pytest.mark.parametrize("capability", [(9, 0), (10, 0)])
def test_bench_defaults_pass_their_check_on_a_gpu_routes(monkeypatch, tmp_path, capsys, capability):
    """`python -m kernels.bench --device cuda` checks fp32 and bf16 against the fp32 loop with
    tolerances 1e-4 and 2e-2. On a GPU's routes (run here on CPU tensors) every case agrees: fp32
    is computed in fp32 (bf16 grouped GEMMs in its place: 4.5e-3 on dw_in at bench shape a), bf16
    natively or by the loop."""
    pretend_gpu(monkeypatch, capability)
    code, rows, text = _tiny_bench(monkeypatch, tmp_path, capsys, dtypes="fp32,bf16")
    assert code == 0 and "REFUSED" not in text and all(r["ms"] == 1.0 for r in rows)


@pytest.mark.parametrize("bad", [["--threads", "-1"], ["--shapes", "zz"], ["--dtypes", "fp16"],
                                 ["--impls", "x"], ["--bogus"]])
def test_bench_bad_input_one_line_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("kernels.bench: error:")

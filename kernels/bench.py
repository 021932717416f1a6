"""Benchmark the MoE dispatch implementations against each other and against a dense reference.

    python -m kernels.bench             # all CPU shapes, fp32 + bf16, eager + compiled: 5-10 min
    python -m kernels.bench --quick     # one shape, fp32, < 1 min
    python -m kernels.bench --device cuda --json out/bench.json

The dense reference does the same FLOPs as the MoE layer with perfect balance and no routing at all:
x (E, T*K/E, D) -> bmm w_in -> gelu -> bmm w_out. In principle no dispatch beats it, so
frac_of_dense = dense_ms / impl_ms is "how much of the achievable throughput this dispatch keeps"
(on a 2-core CPU the per-expert matmuls of the loop sometimes run faster than the bmm: see
docs/kernels.md). speedup_vs_loop = loop_eager_ms / impl_ms, same shape, dtype and pass.
Routing is random top-k (distinct experts per token, softmax gates), so loads are nearly balanced;
"capacity" runs with capacity_factor 1.25 and so drops a few assignments.

Checked before timed: every implementation's output and its gradients for x, gates, w_in and w_out
(with a random upstream gradient) are compared at the benchmark shape with the eager loop run in
fp32 on the same values (for "capacity": the loop with the slots it should drop removed, and the
drop mask itself). An implementation whose relative error ||got - want|| / ||want|| exceeds the
dtype's tolerance gets no time: its row says "refused", its JSON ms is null, and the exit status
is 1. Timed: the median of interleaved rounds (data.run.interleaved_ms), after two warm-up calls,
at least 5 rounds and about 1 s per case (at most 50 rounds).

GPU (H200-sized) shapes, bf16:
    python -m kernels.bench --device cuda --shapes gpu,gpu_e64 --dtypes bf16
Each shape's log names the grouped GEMM's route (kernels.grouped_route): on CUDA "native"
(torch._grouped_mm) only on sm90 in bf16; fp32 "grouped" there times the per-group loop, in fp32.
"""

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from data.run import (BadInput, flag, interleaved_ms, main as guarded, parse_flags, parse_list,
                      pick_device, set_threads, write_json)
from kernels import moe_ffn

# name: (T, D, H, E, K)
SHAPES = {
    "a": (2048, 128, 512, 8, 2),
    "b": (8192, 256, 1024, 8, 2),
    "c": (2048, 128, 128, 64, 8),
    "gpu": (65536, 1024, 4096, 8, 2),        # with --device cuda
    "gpu_e64": (65536, 1024, 4096, 64, 8),   # with --device cuda
}
CAPACITY_FACTOR = 1.25
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}   # relative error allowed against the fp32 loop
GRAD_NAMES = ("y", "dx", "dgates", "dw_in", "dw_out")


def rounds_for(fns, device, min_rounds=5, seconds_per_fn=1.0, max_rounds=50):
    """How many rounds of interleaved_ms time each fn in {name: fn(round)} for about seconds_per_fn,
    at least min_rounds and at most max_rounds. Every fn is called twice here: warm-up (compile,
    caches, the allocator), and the second call measures what one round costs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for f in fns.values():
        f(0)
    sync()
    t0 = time.perf_counter()
    for f in fns.values():
        f(0)
    sync()
    round_s = max(time.perf_counter() - t0, 1e-9)
    return max(min_rounds, min(max_rounds, math.ceil(seconds_per_fn * len(fns) / round_s)))


def make_inputs(T, D, H, E, K, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device, dtype).requires_grad_()
    scores = torch.randn(T, E, generator=g).to(device)
    top_v, idx = scores.topk(K, dim=-1)                       # distinct experts per token
    gates = F.softmax(top_v, dim=-1).to(dtype).requires_grad_()
    w_in = (torch.randn(E, D, H, generator=g) / D ** 0.5).to(device, dtype).requires_grad_()
    w_out = (torch.randn(E, H, D, generator=g) / H ** 0.5).to(device, dtype).requires_grad_()
    grad_y = torch.randn(T, D, generator=g).to(device, dtype)  # random upstream gradient
    return x, idx, gates, w_in, w_out, grad_y


def step_fns(forward, params, grad_y):
    """(forward-only fn, forward+backward fn) for one callable returning y."""
    def fwd():
        forward()

    def fwd_bwd():
        for p in params:
            p.grad = None
        forward().backward(grad_y)
    return fwd, fwd_bwd


def expected_drops(idx_TK, E, C):
    """Which assignments "capacity" must drop: an expert keeps its first C in token order
    (t*K + k)."""
    idx_A = idx_TK.reshape(-1)
    order_A = torch.argsort(idx_A, stable=True)
    sorted_A = idx_A[order_A]
    first_A = torch.searchsorted(sorted_A, sorted_A)
    pos_sorted = torch.arange(len(idx_A), device=idx_A.device) - first_A
    pos_A = torch.empty_like(pos_sorted).scatter_(0, order_A, pos_sorted)   # place in its queue
    return (pos_A >= C).view(idx_TK.shape)


def value_and_grads(fn, inputs, grad_y):
    """[y, dx, dgates, dw_in, dw_out] of fn(x, idx, gates, w_in, w_out) -> (y, dropped), and
    dropped."""
    x, idx, gates, w_in, w_out = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x, gates, w_in, w_out)]
    y, dropped = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return [y.detach()] + list(grads), dropped


def check_impl(impl, compiled, inputs, grad_y):
    """Compare one implementation with the fp32 eager loop at this shape. Returns (ok, message)."""
    x, idx, gates, w_in, w_out = inputs
    dtype = x.dtype
    fn = lambda *a: moe_ffn(*a, impl=impl, capacity_factor=CAPACITY_FACTOR, compile=compiled)
    got, dropped = value_and_grads(fn, inputs, grad_y)
    keep = torch.ones_like(idx, dtype=torch.bool)
    if impl == "capacity":
        T, K = idx.shape
        E = w_in.shape[0]
        want_dropped = expected_drops(idx, E, kernels.capacity(T, K, E, CAPACITY_FACTOR))
        if not torch.equal(dropped, want_dropped):
            return False, (f"dropped {int(dropped.sum())} assignments, expected "
                           f"{int(want_dropped.sum())}")
        keep = ~want_dropped
    # the oracle: kernels' per-expert loop in fp32, called directly (not through moe_ffn's table)
    ref_inputs = [t.float() if t.is_floating_point() else t for t in inputs]
    ref_inputs[2] = ref_inputs[2] * keep                               # a dropped slot weighs 0
    want, _ = value_and_grads(lambda *a: kernels._moe_loop(*a, 0.0), ref_inputs, grad_y.float())
    want[2] = want[2] * keep                                           # ...and no gate gradient
    worst = max((float((g.float() - w).norm() / w.norm().clamp_min(1e-30)), n)
                for n, g, w in zip(GRAD_NAMES, got, want))
    ok = worst[0] <= TOL[dtype]
    return ok, f"worst relative error {worst[0]:.1e} ({worst[1]}), tolerance {TOL[dtype]:.0e}"


def bench_shape(name, dtype, device, impls, compiled_modes, log):
    """Check every implementation against the fp32 loop at one shape and dtype, then time those that
    agree, interleaved with the dense reference -> one row per case and pass."""
    T, D, H, E, K = SHAPES[name]
    x, idx, gates, w_in, w_out, grad_y = make_inputs(T, D, H, E, K, dtype, device)
    params, inputs = (x, gates, w_in, w_out), (x, idx, gates, w_in, w_out)
    shape = f"T{T}_D{D}_H{H}_E{E}_K{K}"
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    log(f"  {shape} {dt}: grouped GEMM route {kernels.dispatch_route(device, dtype, D, H)}")

    # dense reference: the same expert FLOPs as perfectly balanced groups, one bmm each
    x_dense = torch.randn(E, T * K // E, D, device=device, dtype=dtype, requires_grad=True)
    g_dense = torch.randn(E, T * K // E, D, device=device, dtype=dtype)

    def dense():
        return torch.bmm(F.gelu(torch.bmm(x_dense, w_in)), w_out)

    cases = [("dense", False, dense, (x_dense, w_in, w_out), g_dense)]
    for impl in impls:
        for compiled in compiled_modes:
            if impl == "loop" and compiled:
                continue  # data-dependent shapes: the loop is the eager reference only
            def run(impl=impl, compiled=compiled):
                return moe_ffn(x, idx, gates, w_in, w_out, impl=impl,
                               capacity_factor=CAPACITY_FACTOR, compile=compiled)[0]
            cases.append((impl, compiled, run, params, grad_y))

    checked = []
    for impl, compiled, fn, ps, gy in cases:
        t0 = time.perf_counter()
        ok, msg = (True, "reference") if impl == "dense" else check_impl(impl, compiled, inputs, gy)
        verdict = "agrees with the loop" if ok else "REFUSED (no time): disagrees with the loop"
        log(f"  {shape} {dt} {impl:8s} {'compiled' if compiled else 'eager':8s} {verdict}; {msg} "
            f"[{time.perf_counter() - t0:.1f}s]")
        checked.append(((impl, compiled), step_fns(fn, ps, gy) if ok else None))
    return time_cases(checked, device, shape, dt, log)


def time_cases(checked, device, shape, dt, log):
    """[((impl, compiled), (fwd, fwd_bwd) or None if refused)] -> rows with ms (None: refused),
    speedup_vs_loop and frac_of_dense; each pass timed with interleaved_ms."""
    rows = []
    for p, pass_name in enumerate(("fwd", "fwd+bwd")):
        timed = {key: (lambda r, f=fns[p]: f()) for key, fns in checked if fns is not None}
        t0 = time.perf_counter()
        ms = interleaved_ms(timed, device, rounds=rounds_for(timed, device), warmup=0)
        log(f"  {shape} {dt} {pass_name}: {len(timed)} cases timed, interleaved "
            f"[{time.perf_counter() - t0:.1f}s]")
        rows += [dict(shape=shape, impl=key[0], compiled=key[1], dtype=dt, **{"pass": pass_name},
                      ms=ms.get(key)) for key, _ in checked]
    for r in rows:
        same = [q for q in rows if q["pass"] == r["pass"]]
        loop_ms = next((q["ms"] for q in same if q["impl"] == "loop" and not q["compiled"]), None)
        dense_ms = next(q["ms"] for q in same if q["impl"] == "dense")
        r["speedup_vs_loop"] = None if r["ms"] is None else (loop_ms or float("nan")) / r["ms"]
        r["frac_of_dense"] = None if r["ms"] is None else dense_ms / r["ms"]
    return rows


def print_table(rows):
    head = (f"{'shape':24s} {'dtype':5s} {'pass':8s} {'impl':9s} {'mode':9s} {'ms':>9s} "
            f"{'vs loop':>8s} {'of dense':>9s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = ("  refused: disagrees with the loop" if r["ms"] is None else
                 f"{r['ms']:9.2f} {r['speedup_vs_loop']:7.2f}x {r['frac_of_dense']:9.2f}")
        print(f"{r['shape']:24s} {r['dtype']:5s} {r['pass']:8s} {r['impl']:9s} "
              f"{'compiled' if r['compiled'] else 'eager':9s} {cells}")


IMPLS, DTYPES = ("loop", "grouped", "capacity"), {"fp32": torch.float32, "bf16": torch.bfloat16}
QUICK = {"shapes": "a", "dtypes": "fp32"}                  # --quick: explicit flags win


@dataclass
class Config:
    quick: bool = flag(False, "one shape (a), fp32 only: under a minute on CPU")
    device: str = flag("cpu", "cpu or cuda", choices=("cpu", "cuda"))
    shapes: str = flag("", f"comma-separated shape names from {', '.join(SHAPES)}; empty = a,b,c "
                       "on CPU, a,b,c,gpu,gpu_e64 on CUDA")
    dtypes: str = flag("fp32,bf16", "comma-separated fp32,bf16 (fp32 with --quick)")
    impls: str = flag(",".join(IMPLS), "which dispatch implementations to time")
    no_compile: bool = flag(False, "eager only (skip torch.compile)")
    threads: int = flag(0, "torch CPU threads (0 = torch's default)")
    json: str = flag("", "also write the records to this JSON file")


def parse_config(argv):
    """argv -> (Config, device, shape names, dtypes, impls); anything unknown is a BadInput."""
    doc = __doc__.strip()
    cfg = parse_flags(Config, argv, "kernels.bench", doc, presets=[("quick", True, QUICK)],
                      epilog=doc[doc.index("\n\n") + 2:])
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    shapes = parse_list(cfg.shapes or ("a,b,c,gpu,gpu_e64" if device.type == "cuda" else "a,b,c"),
                        str, "shapes")
    dtypes, impls = parse_list(cfg.dtypes, str, "dtypes"), parse_list(cfg.impls, str, "impls")
    for name, given, known in (("shapes", shapes, SHAPES), ("dtypes", dtypes, DTYPES),
                               ("impls", impls, IMPLS)):
        if bad := [v for v in given if v not in known]:
            raise BadInput(f"--{name}: unknown {name[:-1]} {bad[0]!r}; choose from "
                           f"{', '.join(known)}")
    return cfg, device, shapes, [DTYPES[d] for d in dtypes], impls


def main(argv=None):
    """parse -> check and time every shape x dtype -> the table (and the JSON records). Bad input:
    one line on stderr, exit status 2; an implementation that disagrees with the loop: exit 1."""
    def parse_and_run():
        cfg, device, shapes, dtypes, impls = parse_config(argv)
        print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
        modes = (False,) if cfg.no_compile else (False, True)
        rows = [r for s in shapes for dtype in dtypes
                for r in bench_shape(s, dtype, device, impls, modes, log=print)]
        print()
        print_table(rows)
        if cfg.json:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
            write_json(cfg.json, rows)
            print(f"wrote {cfg.json}")
        refused = sorted({f"{r['impl']} {'compiled' if r['compiled'] else 'eager'} {r['dtype']} "
                          f"{r['shape']}" for r in rows if r["ms"] is None})
        if refused:
            print(f"refused to time {len(refused)} case(s) that disagree with the loop: "
                  f"{'; '.join(refused)}")
            sys.exit(1)
        return rows
    return guarded("kernels.bench", parse_and_run)


if __name__ == "__main__":
    main()

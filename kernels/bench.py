"""Benchmark the MoE dispatch implementations against each other and against a dense reference.

    python -m kernels.bench             # all CPU shapes, fp32 + bf16, eager + compiled (~5-10 min on 2 cores)
    python -m kernels.bench --quick     # one shape, fp32, < 1 min
    python -m kernels.bench --device cuda --json out/bench.json

The dense reference does the same FLOPs as the MoE layer with perfect balance and no routing at all:
x (E, T*K/E, D) -> bmm w_in -> gelu -> bmm w_out. No dispatch can beat it, so
frac_of_dense = dense_ms / impl_ms is "how much of the achievable throughput this dispatch keeps".
speedup_vs_loop = loop_eager_ms / impl_ms, same shape, dtype and pass.
Routing is random top-k (distinct experts per token, softmax gates), so loads are nearly balanced;
"capacity" runs with capacity_factor 1.25 and so drops a few assignments.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kernels import moe_ffn

# name: (T, D, H, E, K)
SHAPES = {
    "a": (2048, 128, 512, 8, 2),
    "b": (8192, 256, 1024, 8, 2),
    "c": (2048, 128, 128, 64, 8),
    "gpu": (65536, 1024, 4096, 8, 2),   # only with --device cuda
}
CAPACITY_FACTOR = 1.25


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, min_runs=5, min_seconds=1.0, warmup=2):
    """Median wall time of fn() in ms, after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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


def bench_shape(name, dtype, device, impls, compiled_modes, log):
    T, D, H, E, K = SHAPES[name]
    x, idx, gates, w_in, w_out, grad_y = make_inputs(T, D, H, E, K, dtype, device)
    params = (x, gates, w_in, w_out)
    shape = f"T{T}_D{D}_H{H}_E{E}_K{K}"
    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]

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

    rows = []
    for impl, compiled, fn, ps, gy in cases:
        t0 = time.perf_counter()
        fwd, fwd_bwd = step_fns(fn, ps, gy)
        for pass_name, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            ms = time_ms(f, device)
            rows.append(dict(shape=shape, impl=impl, compiled=compiled, dtype=dt, **{"pass": pass_name}, ms=ms))
        log(f"  {shape} {dt} {impl:8s} {'compiled' if compiled else 'eager':8s} done in {time.perf_counter() - t0:.1f}s")

    for r in rows:
        same = [q for q in rows if q["pass"] == r["pass"]]
        loop_ms = next((q["ms"] for q in same if q["impl"] == "loop" and not q["compiled"]), float("nan"))
        dense_ms = next(q["ms"] for q in same if q["impl"] == "dense")
        r["speedup_vs_loop"] = loop_ms / r["ms"]
        r["frac_of_dense"] = dense_ms / r["ms"]
    return rows


def print_table(rows):
    head = f"{'shape':24s} {'dtype':5s} {'pass':8s} {'impl':9s} {'mode':9s} {'ms':>9s} {'vs loop':>8s} {'of dense':>9s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['shape']:24s} {r['dtype']:5s} {r['pass']:8s} {r['impl']:9s} "
              f"{'compiled' if r['compiled'] else 'eager':9s} {r['ms']:9.2f} {r['speedup_vs_loop']:7.2f}x "
              f"{r['frac_of_dense']:9.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape (a), fp32 only: under a minute on CPU")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--shapes", default=None,
                    help=f"comma-separated shape names from {sorted(SHAPES)} (default: a,b,c on CPU; a,b,c,gpu on CUDA)")
    ap.add_argument("--dtypes", default=None, help="comma-separated fp32,bf16 (default both; fp32 with --quick)")
    ap.add_argument("--impls", default="loop,grouped,capacity", help="which dispatch implementations to time")
    ap.add_argument("--no-compile", action="store_true", help="eager only (skip torch.compile)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--json", default=None, help="also write the records to this JSON file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    default_shapes = "a" if args.quick else ("a,b,c,gpu" if device.type == "cuda" else "a,b,c")
    shapes = (args.shapes or default_shapes).split(",")
    dtype_names = (args.dtypes or ("fp32" if args.quick else "fp32,bf16")).split(",")
    impls = args.impls.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; choose from {sorted(SHAPES)}")
    dtypes = []
    for d in dtype_names:
        if d not in ("fp32", "bf16"):
            ap.error(f"--dtypes: unknown dtype {d!r}; choose fp32 or bf16")
        dtypes.append(torch.float32 if d == "fp32" else torch.bfloat16)
    for i in impls:
        if i not in ("loop", "grouped", "capacity"):
            ap.error(f"--impls: unknown impl {i!r}")
    compiled_modes = (False,) if args.no_compile else (False, True)

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    rows = []
    for s in shapes:
        for dtype in dtypes:
            rows += bench_shape(s, dtype, device, impls, compiled_modes, log=print)
    print()
    print_table(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

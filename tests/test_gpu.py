"""GPU checks, for a machine with CUDA (every test here is skipped where there is none):

    pytest tests/test_gpu.py

- each paper file's GPU path for a few steps (bf16 autocast + --compile where the file has them,
  moe_testbed.py --preset gpu shortened): exit 0, finite losses, results.json written;
- kernels.moe_ffn on CUDA, every implementation, against the float64 oracle of
  tests/test_kernels.py: output and the four gradients, bf16 and fp32, an aligned and an unaligned
  width, one idle expert (whose weight gradients must be exactly 0);
- the grouped dispatch free of host syncs on the native route (an MoE layer's forward + backward
  under torch.cuda.set_sync_debug_mode("error")), and the loop route's syncs counted: 6 per MoE
  layer per forward + backward, as docs/kernels.md says;
- kernels.bench's own oracle check passes on CUDA in fp32 and bf16;
- moe_testbed.py launched by torchrun on CUDA equals the same run on the CPU (1 process; 2
  processes, NCCL against gloo, where 2 GPUs exist).
Written to take a few minutes on one H100/H200 (compilation included); not run yet: no GPU was
available where it was written.
"""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kernels  # noqa: E402
import moe_testbed as mt  # noqa: E402
from test_kernels import (TOL, as_double, assert_rel_close, make, oracle,  # noqa: E402
                          value_and_grads)
from test_moe_ddp import CLI as DDP_CLI, _text_dir  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="4")
CUDA = "cuda"


def _gpu_name():
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm{major}{minor})"


def _run(argv, tmp_path, timeout=300):
    """python argv... in the repository root; returns stdout after asserting exit 0."""
    p = subprocess.run([sys.executable] + argv, cwd=ROOT, env=ENV, text=True, capture_output=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{' '.join(argv)}: exit {p.returncode}\n{p.stderr[-4000:]}"
    return p.stdout


def _finite_losses(out_dir):
    """results.json is there and parses; every loss / bpb in it and in metrics.jsonl is finite."""
    res = json.loads((out_dir / "results.json").read_text())
    found = []

    def walk(obj, key=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, k)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, key)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and (
                "loss" in key or "bpb" in key):
            found.append((key, obj))
    walk(res)
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            walk(json.loads(line))
    assert found, "no loss or bpb recorded"
    bad = [(k, v) for k, v in found if not math.isfinite(v)]
    assert not bad, f"non-finite: {bad[:5]}"
    return res


# ---------------------------------------------------------------- each paper file's GPU path

def test_moe_testbed_gpu_preset(tmp_path):
    """--preset gpu (d 512, 8 blocks, bf16, compile, 2 micro-batches, global scope) for 20 steps."""
    out = tmp_path / "moe"
    text = _run(["moe_testbed.py", "--preset", "gpu", "--steps", "20", "--warmup", "5",
                 "--log-every", "10", "--eval-seqs", "4", "--train-bytes", "400000",
                 "--out", str(out)], tmp_path)
    res = _finite_losses(out)
    route = kernels.dispatch_route(CUDA, torch.bfloat16, 512, 1024)
    assert res["dispatch"]["route"] == route and text.count(f"grouped GEMM route {route}") == 1
    assert "MFU" in text or "model TFLOP/s" in text
    assert all(math.isfinite(h["train_bpb"]) for h in res["runs"][0]["history"])


def test_logit_correction_quick_on_cuda(tmp_path):
    """LC's MLP has no bf16 / compile flags: its --quick on CUDA."""
    _run(["logit_correction.py", "--quick", "--device", "cuda", "--out", str(tmp_path / "lc")],
         tmp_path)
    _finite_losses(tmp_path / "lc")


@pytest.mark.parametrize("script", ["multimodal_align.py", "qformer_efficient.py"])
def test_multimodal_quick_bf16_compiled(tmp_path, script):
    out = tmp_path / script.split(".")[0]
    _run([script, "--quick", "--device", "cuda", "--dtype", "bfloat16", "--compile", "--out",
          str(out)], tmp_path, timeout=420)
    _finite_losses(out)


# ------------------------------------------------------------ kernels against the float64 oracle

def _idle_expert_routing(T, E, K):
    """Top-k over the first E-1 experts only: expert E-1 gets no token."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(T, E - 1, generator=g).topk(K, dim=-1).indices


@pytest.mark.parametrize("D,H", [(16, 32), (12, 20)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl,compiled", [("loop", False), ("grouped", False), ("capacity", False),
                                           ("grouped", True)])
def test_kernels_on_cuda_match_the_float64_oracle(impl, compiled, dtype, D, H):
    if compiled and (D, H) != (16, 32):
        pytest.skip("compiled: the aligned width only (compilation time)")
    T, E, K = 64, 4, 2
    args = make(T, D, H, E, K, idx=_idle_expert_routing(T, E, K))           # float64, on the CPU
    want, _ = value_and_grads(oracle, *args)
    on_gpu = [a.to(CUDA, dtype) if a.is_floating_point() else a.to(CUDA) for a in args]
    got, dropped = value_and_grads(kernels.moe_ffn, *on_gpu, impl=impl, capacity_factor=float(E),
                                   compile=compiled)
    got = [g.cpu() for g in got]
    assert all(g.dtype == dtype for g in got) and not dropped.any()
    assert_rel_close(got, as_double(want), TOL[dtype])
    # the idle expert: no weight gradient at all (pytorch/pytorch#172439 reports otherwise on sm100)
    assert got[3][E - 1].abs().max() == 0 and got[4][E - 1].abs().max() == 0


# ---------------------------------------------------------------- host syncs in an MoE layer

def _moe_layer_step(dtype, D=64, H=128):
    """An MoE layer of moe_testbed.py (router, dispatch, aux and z losses) on CUDA: a closure that
    runs one forward + backward (under bf16 autocast for dtype bf16)."""
    cfg = mt.Config(experts=8, top_k=2, n_layer=2, d_model=D, n_head=2, expert_hidden=H, seq_len=32,
                    batch_size=4, balance="aux", balance_scope="global")
    torch.manual_seed(0)
    layer = mt.MoEFFN(cfg, 8).to(CUDA)
    x = torch.randn(4, 32, D, device=CUDA, requires_grad=True)
    grad_y = torch.randn(4, 32, D, device=CUDA)
    ctx = dict(tok_BS=torch.zeros(4, 32, dtype=torch.long, device=CUDA),
               dom_B=torch.arange(4, device=CUDA))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y, st = layer(x, ctx)
        ((y.float() * grad_y).sum() + st["aux"] + st["z"]).backward()
    step()                                            # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    return step


def test_grouped_moe_layer_is_sync_free_on_the_native_route():
    route = kernels.dispatch_route(CUDA, torch.bfloat16, 64, 128)
    if route != "native":
        pytest.skip(f"{_gpu_name()} takes the {route} route (native: sm90, bf16, aligned widths)")
    step = _moe_layer_step(torch.bfloat16)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()                                                 # any host sync raises here
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_loop_route_syncs_six_times_per_layer():
    """fp32 on CUDA takes the loop (computed in fp32): one host read of the group ends per grouped
    GEMM, 2 forward + 4 backward = 6 per MoE layer per forward + backward (docs/kernels.md)."""
    assert kernels.dispatch_route(CUDA, torch.float32, 64, 128) == "loop"
    step = _moe_layer_step(torch.float32)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 6, [str(w.message)[:120] for w in caught]


# ------------------------------------------------------------ kernels.bench checks before timing

def test_bench_oracle_check_passes_on_cuda_in_fp32_and_bf16(tmp_path):
    """The bench's default dtypes (fp32, bf16) at two small shapes, eager: every case agrees with
    the fp32 loop (exit 0), so no case is refused."""
    text = _run(["-m", "kernels.bench", "--device", "cuda", "--shapes", "a,c", "--no-compile",
                 "--json", str(tmp_path / "bench.json")], tmp_path)
    assert "REFUSED" not in text
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert rows and all(r["ms"] is not None for r in rows)


# ---------------------------------------------------------------- torchrun on CUDA == the CPU run

CLI = DDP_CLI + ["--accum", "2"]           # tests/test_moe_ddp.py's tiny run, in 2 micro-batches


def _torchrun(nproc, device, data, out, tmp_path):
    text = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                 "moe_testbed.py"] + CLI + ["--device", device, "--data-dir", data, "--out",
                                            str(out)],
                tmp_path, timeout=240)
    return text, json.loads((out / "results.json").read_text())["runs"][0]


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_on_cuda_equals_the_cpu_run(tmp_path, nproc):
    """The same seed and global batches on CUDA (NCCL for 2 processes; one process forms no group)
    and on the CPU (gloo): the same training loss and val bpb up to float summation order."""
    if nproc > torch.cuda.device_count():
        pytest.skip(f"{nproc} processes need {nproc} GPUs; {torch.cuda.device_count()} here")
    data = _text_dir(tmp_path)
    text, gpu = _torchrun(nproc, "cuda", data, tmp_path / "gpu", tmp_path)
    _, cpu = _torchrun(nproc, "cpu", data, tmp_path / "cpu", tmp_path)
    if nproc > 1:
        assert "(nccl)" in text
    assert gpu["world_size"] == cpu["world_size"] == nproc
    assert gpu["history"][0]["train_bpb"] == pytest.approx(cpu["history"][0]["train_bpb"], abs=1e-3)
    assert gpu["val_bpb"] == pytest.approx(cpu["val_bpb"], abs=2e-3)

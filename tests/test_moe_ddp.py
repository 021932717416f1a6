"""Data parallelism in moe_testbed.py, on CPU with gloo and 2 processes: every scope's aux loss and
its gradients on 2 ranks x accum A equal one process with accum 2A on the same batch (the same
micro-batches in the same order; global scope: the counts cross the ranks and the micro-batches),
and so do global-capacity drops and aux-free biases; a 2-rank torchrun run (and its --resume)
writes results.json from rank 0, bad input exits every rank with status 2, and the presets.

Processes are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
in the environment), each with one thread; every launch has a timeout, so a hang fails instead of
blocking."""

import json
import os
import signal
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import moe_testbed as mt  # noqa: E402
from data import run  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
TINY = dict(experts=4, top_k=2, n_layer=2, moe_layers="all", d_model=16, n_head=2, expert_hidden=8,
            seq_len=8, batch_size=8, warmup=2, threads=1)
# name -> Config overrides on 2 ranks; one process runs the same with twice the accumulation
CASES = {
    "aux-global": dict(balance="aux", balance_scope="global"),
    "aux-global-accum2": dict(balance="aux", balance_scope="global", accum=2),
    "aux-micro": dict(balance="aux", balance_scope="micro"),
    "aux-sequence": dict(balance="aux", balance_scope="sequence"),
    "auxfree-global": dict(balance="aux_free", balance_scope="global"),
    "auxfree-micro": dict(balance="aux_free", balance_scope="micro"),
    "capacity-global": dict(balance="aux", balance_scope="global", capacity_factor=0.5,
                            capacity_scope="global"),
}

CPU = torch.device("cpu")


def _doms():
    """4 tiny domains, each its own byte range (no files, no generator: milliseconds)."""
    rng = np.random.default_rng(0)
    return types.SimpleNamespace(names=list("abcd"),
                                 train=[rng.integers(40 * d, 40 * d + 50, 3000) for d in range(4)],
                                 val=[rng.integers(40 * d, 40 * d + 50, 500) for d in range(4)])


def _measure(case, accum_scale=1):
    """On this rank: (1) the step's aux loss and the DDP-averaged gradients of the aux loss alone;
    (2) two real train_steps (wrap_ddp, the total loss, clipping, AdamW, the aux-free update): the
    gradients the second leaves, its logged losses, its dropped slots and the MoE biases afterwards.
    """
    o = CASES[case]
    cfg = mt.Config(**TINY, **{**o, "accum": o.get("accum", 1) * accum_scale})
    doms, (_, world) = _doms(), run.rank_world()
    torch.manual_seed(0)
    model = mt.Model(cfg, 4)
    _, aux, _ = mt.accumulate_grads(mt.wrap_ddp(model, cfg), cfg, doms, 3, CPU, aux_only=True)
    out = dict(aux=(run.all_ranks_sum(aux) / world).item(),
               aux_grads={n: p.grad.clone() for n, p in model.named_parameters()})
    torch.manual_seed(0)
    model = mt.Model(cfg, 4)
    net = mt.wrap_ddp(model, cfg)
    opt = mt.make_optimizer(model, cfg, CPU)
    for step in range(2):                       # two steps: the second routes with the updated bias
        ce, aux_logged, records = mt.train_step(net, opt, cfg, doms, step, CPU)
    drops = run.all_ranks_sum(sum(st[0]["n_drop"] + st[1]["n_drop"] for st, _ in records))
    out.update(ce=ce.item(), aux_logged=aux_logged.item(), drops=int(drops),
               grads={n: p.grad.clone() for n, p in model.named_parameters()},
               bias=[b.ffn.bias_E.clone() for b in model.blocks])
    return out


def _worker(out_dir):
    """Entry point of one spawned rank: join the group exactly as moe_testbed.main does, measure
    every case."""
    run.setup_distributed("cpu", int(os.environ["WORLD_SIZE"]))
    torch.set_num_threads(1)
    try:
        res = {case: _measure(case) for case in CASES}
        torch.save(res, os.path.join(out_dir, f"rank{run.rank_world()[0]}.pt"))
    finally:
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)                                         # as run.exit_process leaves a torchrun rank


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv, n=2, timeout=90):
    """Start n ranks of `python argv...` with torchrun's environment; returns [(returncode, stdout,
    stderr)]."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable] + argv, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(n)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:                         # a hang fails the test and leaves no process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _torchrun(args, timeout=120, env=ENV):
    """The real launcher. On a timeout: SIGTERM first (torchrun then stops its workers), SIGKILL its
    group later."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "moe_testbed.py"] + args, cwd=ROOT, env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        pytest.fail(f"torchrun {' '.join(args)} did not finish in {timeout} s")
    return types.SimpleNamespace(returncode=p.returncode, stdout=out, stderr=err)


# ---------------------------------------------------------- 2 ranks == 1 process on the whole batch

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    runs = _launch([os.path.abspath(__file__), str(out)])
    for rc, _, err in runs:
        assert rc == 0, err[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, case):
    one = _measure(case, accum_scale=2)                    # this process: no process group, world 1
    for r in range(2):
        got = two_ranks[r][case]
        assert got["aux"] == pytest.approx(one["aux"], rel=1e-6, abs=1e-9), (case, r)
        assert got["aux_grads"].keys() == one["aux_grads"].keys()
        for n, g in one["aux_grads"].items():
            torch.testing.assert_close(got["aux_grads"][n], g, rtol=1e-5, atol=1e-9,
                                       msg=f"{case} rank {r} {n}")
        for n, g in one["grads"].items():
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-7,
                                       msg=f"{case} rank {r} {n}")
        assert got["ce"] == pytest.approx(one["ce"], rel=1e-6)
        assert got["aux_logged"] == pytest.approx(one["aux_logged"], rel=1e-6, abs=1e-9)
        assert got["drops"] == one["drops"] and (one["drops"] > 0) == case.startswith("capacity")
        for b_got, b_one in zip(got["bias"], one["bias"]):
            torch.testing.assert_close(b_got, b_one, rtol=0, atol=1e-9)
    if case.startswith("aux-"):
        # the router weights do feel the aux loss (so the comparison above is not vacuous)
        assert any(n.endswith("router.weight") and g.abs().max() > 0
                   for n, g in one["aux_grads"].items())
    if case.startswith("auxfree"):
        assert any(b.abs().max() > 0 for b in one["bias"])


def test_global_scope_needs_the_cross_rank_counts(two_ranks):
    """Without summing f over ranks (each rank's own f), the 2-rank aux loss would differ from the
    one-process value: recompute it from the ranks' own counts to show the check above can tell the
    two apart."""
    cfg = mt.Config(**TINY, **CASES["aux-global"])
    torch.manual_seed(0)
    model = mt.Model(cfg, 4)
    losses = []
    for r in range(2):                                     # rank r's rows, its own counts only
        batch = mt.train_batch(_doms(), 8, 8, 0, 3)
        x, _, dom = (torch.from_numpy(a[4 * r:4 * r + 4]) for a in batch)
        _, stats = model(x, dom)
        losses.append(sum(st["aux"] for st in stats).item())
    assert abs(np.mean(losses) - two_ranks[0]["aux-global"]["aux"]) > 1e-6


# ---------------------------------------------------------------- torchrun end to end, bad input

def _text_dir(tmp_path):
    d = tmp_path / "text"
    rng = np.random.default_rng(0)
    for i, alphabet in enumerate(["abcdef", "αβγδεζ", "абвгде"]):
        (d / f"dom{i}").mkdir(parents=True)
        paras = ["".join(alphabet[j] for j in rng.integers(0, 6, 300)) for _ in range(20)]
        (d / f"dom{i}" / "a.txt").write_text("\n\n".join(paras), encoding="utf-8")
    return str(d)


CLI = ["--experts", "4", "--d-model", "16", "--n-head", "2", "--expert-hidden", "8",
       "--seq-len", "16", "--batch-size", "8", "--steps", "4", "--warmup", "2", "--eval-seqs", "2",
       "--log-every", "2", "--ckpt-every", "2", "--threads", "1"]


def test_torchrun_two_ranks_resume_writes_results_on_rank0(tmp_path):
    args = CLI + ["--data-dir", _text_dir(tmp_path), "--out", str(tmp_path / "o")]
    p = _torchrun(args + ["--stop-at", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (tmp_path / "o" / "results.json").exists()
    p = _torchrun(args + ["--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 0 only
    assert p.stdout.count("resuming at step 2") == 1 and p.stdout.count("results.json\n") == 1
    assert p.stdout.count("1 micro-batch(es) of 4 sequences x 2 processes (gloo)") == 1
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["world_size"] == 2 and res["runs"][0]["world_size"] == 2
    # PNGs: with matplotlib
    assert sorted(f for f in os.listdir(tmp_path / "o") if not f.endswith(".png")) == [
        "aux-global-s0", "data_cache", "metrics.jsonl", "results.json"]
    metrics = (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(ln)["step"] for ln in metrics]
    assert steps == [2, 4]                     # rank 0 alone logs: step 2 before --stop-at, 4 after
    assert sorted(os.listdir(tmp_path / "o" / "aux-global-s0")) == ["ckpt.pt", "result.json"]
    # the same global batches in one process: the same run up to gradient summation order
    one = mt.main(args[:-1] + [str(tmp_path / "one")])[0]
    assert res["runs"][0]["val_bpb"] == pytest.approx(one["val_bpb"], abs=1e-3)


@pytest.mark.parametrize("bad,msg", [
    (["--batch-size", "7"], "x the number of processes (WORLD_SIZE=2)"),
    (["--device", "cuda"], "not available"), (["--bench"], "without torchrun"),
    (["--router", "oracle"], "--router: invalid choice")])                           # argparse's
def test_bad_input_every_rank_exits_2_one_line(tmp_path, bad, msg):
    if bad == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    runs = _launch(["moe_testbed.py"] + CLI + ["--out", str(tmp_path / "o")] + bad, timeout=60)
    assert [rc for rc, _, _ in runs] == [2, 2]
    err0, err1 = runs[0][2].strip(), runs[1][2].strip()
    assert len(err0.splitlines()) == 1 and err0.startswith("moe_testbed.py: error:") and msg in err0
    assert err1 == "" and "Traceback" not in err0
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rank0_late_s", [0, 3])
def test_bad_input_under_torchrun_one_error_line_no_hang(tmp_path, rank0_late_s):
    """With rank 0 started 3 s late (a sitecustomize sleeps in rank 0 only), rank 1 fails the check
    first; torchrun stops the other ranks as soon as one exits, so before the fix rank 0 never
    printed the error (CI)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import os, time\nif os.environ.get('RANK') == '0':\n"
                                           f"    time.sleep({rank0_late_s})\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(site), ROOT]))
    p = _torchrun(CLI + ["--batch-size", "7", "--out", str(tmp_path / "o")], timeout=60, env=env)
    assert p.returncode != 0
    lines = [ln for ln in (p.stdout + p.stderr).splitlines()
             if ln.startswith("moe_testbed.py: error:")]
    assert len(lines) == 1 and "x the number of processes (WORLD_SIZE=2)" in lines[0]


def test_world_size_without_torchrun_env_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(SystemExit) as e:
        mt.main(CLI + ["--data-dir", _text_dir(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "launch with torchrun" in err
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------- presets

def test_presets_and_explicit_flags_win():
    assert mt.parse_args([]) == mt.Config() == mt.parse_args(["--preset", "cpu"])
    g = mt.parse_args(["--preset", "gpu"])
    assert (g.d_model, g.batch_size, g.dtype, g.compile) == (512, 64, "bfloat16", True)
    g = mt.parse_args(["--preset", "gpu", "--d-model", "64", "--no-compile", "--dtype", "float32"])
    assert (g.d_model, g.compile, g.dtype, g.n_layer) == (64, False, "float32", 8)
    assert mt.parse_args(["--compile"]).compile and not mt.parse_args([]).compile


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the message on a machine without CUDA")
def test_gpu_preset_without_cuda_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mt.main(["--preset", "gpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--preset gpu" in err


if __name__ == "__main__":                                 # a rank started by _launch
    _worker(sys.argv[1])


SLOW_RANK0 = '''
import os, sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
import moe_testbed as mt
from data.run import exit_process
log = open(os.path.join({events!r}, "rank" + os.environ["RANK"]), "a")
def event(name):
    log.write(f"{{name}} {{time.time()}}\\n"); log.flush()
save, destroy = mt.save_checkpoint, dist.destroy_process_group
# only rank 0 saves: hold it back while rank 1 finishes
def slow_save(*a, **k):
    time.sleep(2); save(*a, **k); event("saved")
def logged_destroy(*a, **k):
    event("destroy"); return destroy(*a, **k)
main = mt.main
# exit_process calls main, then leaves as a torchrun rank does
def logged_main(argv):
    out = main(argv); event("exit"); return out
mt.save_checkpoint, dist.destroy_process_group = slow_save, logged_destroy
exit_process(logged_main, sys.argv[1:])
'''


@pytest.mark.parametrize("stop", [["--stop-at", "2"], []])
def test_torchrun_slow_rank0_every_rank_leaves_together(tmp_path, stop):
    """The shutdown race: rank 0 checkpoints slowly while rank 1 has nothing left to do. No rank may
    destroy the process group before rank 0's last checkpoint is written, and every rank exits 0."""
    events = tmp_path / "events"
    events.mkdir()
    script = tmp_path / "slow_rank0.py"
    script.write_text(SLOW_RANK0.format(root=ROOT, events=str(events)))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(script)] + CLI + ["--out", str(tmp_path / "o")]
                       + stop, cwd=ROOT, env=ENV, text=True, capture_output=True, timeout=180)
    ev_text = {r: (events / f"rank{r}").read_text() if (events / f"rank{r}").exists() else ""
               for r in (0, 1)}
    assert p.returncode == 0, p.stderr[-3000:] + f"\nevents: {ev_text}"
    ev = {r: [ln.split() for ln in (events / f"rank{r}").read_text().splitlines()] for r in (0, 1)}
    assert [name for name, _ in ev[1]] == ["destroy", "exit"]  # rank 1 saves nothing, exits cleanly
    assert [name for name, _ in ev[0]][-2:] == ["destroy", "exit"]
    last_save = max(float(t) for name, t in ev[0] if name == "saved")
    first_destroy = min(float(t) for r in (0, 1) for name, t in ev[r] if name == "destroy")
    assert first_destroy > last_save, (
        "a rank tore the process group down while rank 0 was still saving")

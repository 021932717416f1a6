"""The habits shared by the four paper files (data/common.py): progress output, metrics.jsonl, device,
threads, mean ± sample std."""
import json

import numpy as np
import pytest
import torch

from data.common import BadInput, log_metrics, mean_sd, mean_std, pick_device, progress, set_threads


def test_progress_without_a_terminal_prints_lines_not_carriage_returns(capsys):
    bar = progress(range(40), "demo")                      # pytest captures stderr: not a terminal
    seen = []
    for i in bar:
        bar.set_postfix(loss=i)
        seen.append(i)
    err = capsys.readouterr().err
    assert seen == list(range(40)) and "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith("demo: 4/40") and lines[0].endswith("loss=3")
    assert lines[-1].startswith("demo: 40/40")


def test_progress_resumed_and_quiet(capsys):
    for _ in progress(range(5, 25), "r", total=25, initial=5):
        pass
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("r: 7/25") and lines[-1].startswith("r: 25/25")
    for _ in progress(range(30), "q", quiet=True):
        pass
    assert capsys.readouterr().err == ""


def test_log_metrics_appends(tmp_path):
    p = str(tmp_path / "metrics.jsonl")
    log_metrics(p, run="a", step=1, loss=2.0)
    log_metrics(p, run="b", step=1, loss=1.5)
    recs = [json.loads(line) for line in open(p)]
    assert recs == [{"run": "a", "step": 1, "loss": 2.0}, {"run": "b", "step": 1, "loss": 1.5}]


def test_mean_sd_is_the_sample_std():
    m, sd = mean_sd([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and sd == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert mean_sd([3.0]) == (3.0, None)
    assert mean_std([1.0, 3.0], ".1f") == "2.0 ± 1.4" and mean_std([]) == "-"


def test_device_and_threads_bad_input():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(BadInput, match="expected auto, cpu, cuda or mps"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="--device cuda"):
            pick_device("cuda")
    with pytest.raises(BadInput, match="--threads"):
        set_threads(-1)


def test_cached_lm_saves_its_config_and_still_reads_bare_caches(tmp_path):
    from types import SimpleNamespace

    from data.common import cached_lm
    cfg = SimpleNamespace(cache_dir=str(tmp_path), data_dir="", d_model=4)
    calls = []

    def train():
        calls.append(1)
        torch.manual_seed(len(calls))
        return torch.nn.Linear(2, 2)

    args = (None, {"<unk>": 0}, cfg, ["d_model"], "lm", lambda: torch.nn.Linear(2, 2), train, torch.device("cpu"))
    a = cached_lm(*args)
    (path,) = tmp_path.glob("lm_*.pt")
    ck = torch.load(path, weights_only=True)
    assert ck["config"] == {"d_model": 4} and ck["vocab"] == {"<unk>": 0}
    b = cached_lm(*args)                                   # loaded, not retrained
    assert len(calls) == 1 and torch.equal(a.weight, b.weight)
    torch.save(a.state_dict(), path)                       # a cache written before configs were stored
    assert torch.equal(cached_lm(*args).weight, a.weight) and len(calls) == 1


def test_cli_help_lists_the_docstring_examples_and_check_numbers(capsys):
    """The --help epilog is the docstring's `python ...` lines (written once); check_numbers names the flag."""
    from dataclasses import dataclass

    from data.common import check_numbers, cli

    @dataclass
    class Cfg:
        steps: int = 0
        lr: float = 1.0

    doc = "Title.\n\n    python x.py --lr 2   # an example\nnot an example: python\n"
    with pytest.raises(SystemExit):
        cli(["--help"], Cfg, dict(steps="s", lr="l"), doc, print, "x.py")
    assert capsys.readouterr().out.endswith("examples:\n  python x.py --lr 2   # an example\n")
    check_numbers(Cfg(), ("lr",), at_least_0=("steps",))
    for cfg, msg in ((Cfg(steps=-1), "--steps must be >= 0, got -1"), (Cfg(lr=float("nan")), "--lr must be positive"),
                     (Cfg(lr=float("inf")), "--lr must be positive and finite, got inf")):
        with pytest.raises(BadInput, match=msg):
            check_numbers(cfg, ("lr",), at_least_0=("steps",))


def test_build_key_changes_with_the_code_and_the_thread_count():
    import data.t5lm as t5lm
    from data.common import build_key
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = build_key(t5lm)
        torch.set_num_threads(2)
        two = build_key(t5lm)
    finally:
        torch.set_num_threads(before)
    assert one != two and one.endswith("threads=1") and two.endswith("threads=2")
    assert build_key(t5lm.T5LM) != build_key(t5lm.pretrain)          # the source is what is hashed
    assert build_key(t5lm) == build_key(t5lm)


def test_a_failed_gate_stops_unless_quick_or_ignore_gates(capsys):
    from types import SimpleNamespace as NS

    from data.common import GateFailed, gate_or_stop
    with pytest.raises(GateFailed, match=r"failed its gate \(frozen LM text ceiling \(x\): shape 0.5 -> FAIL\)"):
        gate_or_stop(NS(ignore_gates=False, quick=False), False, "frozen LM text ceiling (x): shape 0.5 -> FAIL")
    for cfg in (NS(ignore_gates=True, quick=False), NS(ignore_gates=False, quick=True)):
        gate_or_stop(cfg, False, "vision encoder: minimal pairs 0.5 -> FAIL")
    gate_or_stop(NS(ignore_gates=False, quick=False), True, "ok -> PASS")
    assert capsys.readouterr().out.count("\n") == 4

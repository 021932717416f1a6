"""The run harness (data/run.py): flags and presets (the flags given win), one-line errors and exit
codes, progress output, metrics.jsonl, device, threads, mean ± sample std, comma lists, the protocol
key, a results.json that is refused when it is not one, the one timing statistic, checkpoints that
carry their config, finished runs, the worker pool, the Hungarian matching. CPU, milliseconds (the
pool: seconds)."""
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from data.run import (BadInput, Stopped, by_protocol, check_numbers, config_key, finished_result,
                      flag, heatmap, heatmap_grid, hungarian, interleaved_ms, load_checkpoint,
                      load_results, log_metrics, main as run_main, mean_sd, mean_std, need,
                      parse_flags, parse_list, parse_seeds, pick_device, pool_map, progress,
                      protocol_key, pyplot, restore, run_each, save_checkpoint, set_threads,
                      worker_threads, write_results)


@dataclass
class Cfg:
    quick: bool = flag(False, "small")
    sweep: bool = flag(False, "large")
    fast: bool = flag(False, "a switch a preset may undo")
    epochs: int = flag(20, "epochs", "optimisation")
    lr: float = flag(0.1, "learning rate", "optimisation")
    pool: str = flag("batch", "where from", "method", ("batch", "global"))
    preset: str = flag("cpu", "machine", "method", ("cpu", "gpu"))
    mode: str = flag("", "bare --mode: all", "method", const="all")
    hidden: int = flag(0, None)


PRESETS = [("preset", "gpu", {"epochs": 100, "fast": True}), ("sweep", True, {"epochs": 50}),
           ("quick", True, {"epochs": 3, "lr": 0.5})]
DOC = "Title line.\n\n    python x.py --lr 2   # an example\nnot an example: python\n"


def parse(argv):
    return parse_flags(Cfg, argv, "x.py", DOC, PRESETS)


def test_parse_flags_order_defaults_then_presets_then_flags_given():
    assert parse([]) == Cfg()
    assert parse(["--quick"]) == Cfg(quick=True, epochs=3, lr=0.5)
    # later preset wins
    assert parse(["--sweep", "--quick"]) == Cfg(quick=True, sweep=True, epochs=3, lr=0.5)
    # explicit flags win
    assert parse(["--quick", "--epochs", "7"]) == Cfg(quick=True, epochs=7, lr=0.5)
    # wherever they stand
    assert parse(["--epochs", "7", "--quick"]) == Cfg(quick=True, epochs=7, lr=0.5)
    assert parse(["--preset", "gpu"]) == Cfg(preset="gpu", epochs=100, fast=True)
    assert parse(["--preset", "gpu", "--no-fast", "--quick"]) == Cfg(preset="gpu", quick=True,
                                                                     epochs=3, lr=0.5)
    assert parse(["--mode"]).mode == "all" and parse(["--mode", "x"]).mode == "x"
    assert parse(["--hidden", "3"]).hidden == 3
    with pytest.raises(SystemExit):
        parse(["--pool", "all"])                                                           # choices
    with pytest.raises(SystemExit):
        parse(["--no-quick"])                                    # --no-x only where a preset sets x


def test_parse_flags_help_groups_defaults_and_examples(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    assert "learning rate (default: 0.1)" in out and "where from (default: batch)" in out
    assert "--fast, --no-fast" in out and "--hidden" not in out
    assert "bare --mode: all (default: -)" in out
    assert out.index("optimisation:") < out.index("method:")
    assert out.endswith("examples:\n  python x.py --lr 2   # an example\n")


def test_one_line_errors_and_exit_codes(capsys):
    def bad():
        raise BadInput("--lr must be positive")

    def stop():
        raise Stopped("a gate failed")
    for fn, code, line in ((bad, 2, "x.py: error: --lr must be positive"),
                           (stop, 3, "x.py: stopped: a gate failed")):
        with pytest.raises(SystemExit) as e:
            run_main("x.py", fn)
        assert e.value.code == code and capsys.readouterr().err == line + "\n"
    with pytest.raises(SystemExit) as e:
        parse(["--bogus"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_check_numbers_names_the_flag():
    check_numbers(Cfg(), ("lr",), at_least_0=("epochs",))
    for cfg, msg in ((Cfg(epochs=-1), "--epochs must be >= 0, got -1"),
                     (Cfg(lr=float("nan")), "--lr must be positive"),
                     (Cfg(lr=float("inf")), "--lr must be positive and finite, got inf")):
        with pytest.raises(BadInput, match=msg):
            check_numbers(cfg, ("lr",), at_least_0=("epochs",))


def test_interleaved_ms_is_the_median_of_the_rounds():
    import time as _t
    calls = []

    def slow_once(r):
        calls.append(r)
        _t.sleep(0.2 if r == 3 else 0.0)
    ms = interleaved_ms({"a": slow_once}, "cpu", rounds=5, warmup=1)
    assert calls == [0, 1, 2, 3, 4, 5] and ms["a"] < 50    # one slow round does not move the median


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


def test_parse_list_and_protocol_key():
    assert parse_list("1, 2,", int, "seeds") == [1, 2]
    for s, msg in (("1,x", "--seeds: cannot parse '1,x'"), (",", "--seeds: empty list")):
        with pytest.raises(BadInput, match=msg):
            parse_list(s, int, "seeds")
    assert protocol_key({"a": 1, "b": [2]}) == protocol_key({"b": [2], "a": 1})
    assert protocol_key({"a": 1, "b": [2]}) != protocol_key({"a": 2, "b": [2]})
    assert len(protocol_key({})) == 8


def test_load_results_and_by_protocol(tmp_path):
    path = tmp_path / "results.json"
    assert load_results(str(path)) == {"runs": []}
    for text in ("{not json", '{"runs": {}}'):
        path.write_text(text)
        with pytest.raises(BadInput, match="move it away"):
            load_results(str(path))
    runs = [{"protocol": "b", "x": 1}, {"protocol": "a", "x": 2}, {"protocol": "b", "x": 3}]
    res = {"runs": runs, "protocols": {"a": {"lr": 1}}}
    path.write_text(json.dumps(res))
    assert list(by_protocol(load_results(str(path)))) == [("a", {"lr": 1}, [runs[1]]),
                                                          ("b", {}, [runs[0], runs[2]])]


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_hungarian_matches_brute_force(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        cost = rng.normal(size=(n, n))
        best = min(itertools.permutations(range(n)),
                   key=lambda p: sum(cost[i, p[i]] for i in range(n)))
        perm = hungarian(cost)
        assert sorted(perm) == list(range(n))
        want = sum(cost[i, best[i]] for i in range(n))
        assert cost[np.arange(n), perm].sum() == pytest.approx(want)


def test_checkpoint_carries_its_config_and_refuses_other_settings(tmp_path):
    """save_checkpoint -> load_checkpoint: the weights without torch.compile's prefix and the state
    as saved; the same settings (free fields aside) load, others are one BadInput naming them; no
    file -> None."""
    path, cfg = str(tmp_path / "ckpt.pt"), Cfg(epochs=5)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    compiled = torch.nn.Module()
    compiled._orig_mod = model                             # what torch.compile's wrapper holds
    save_checkpoint(path, compiled, cfg, step=3, history=[1, 2])
    ck = load_checkpoint(path, Cfg(epochs=5, quick=True), free=("quick",))
    assert ck["step"] == 3 and ck["history"] == [1, 2] and ck["config"]["epochs"] == 5
    assert set(ck["model"]) == {"0.weight", "0.bias"}
    assert torch.equal(ck["model"]["0.weight"], model[0].weight)
    with pytest.raises(BadInput, match="different settings: epochs, lr"):
        load_checkpoint(path, Cfg(epochs=6, lr=0.2))
    assert load_checkpoint(str(tmp_path / "none.pt"), cfg) is None
    assert not os.path.exists(path + ".tmp")


def test_config_key_and_finished_result(tmp_path):
    key = config_key(Cfg(), free=("hidden",))
    assert key == config_key(Cfg(hidden=3), free=("hidden",))
    assert key != config_key(Cfg(lr=0.2), free=("hidden",))
    assert '"hidden"' not in key and json.loads(key)["epochs"] == 20
    path = tmp_path / "result.json"
    assert finished_result(str(path), key) is None
    path.write_text(json.dumps({"config_key": key, "val": 1}))
    assert finished_result(str(path), key) == {"config_key": key, "val": 1}
    assert finished_result(str(path), config_key(Cfg(lr=0.2))) is None


def test_restore_puts_back_weights_optimizer_and_rng(tmp_path):
    """save_checkpoint(opt=, rng=, **state) -> restore: the same weights, optimizer state and RNG
    stream in fresh objects, and the rest of the state returned; no file -> None."""
    path = str(tmp_path / "ckpt.pt")
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_checkpoint(path, model, Cfg(), opt=opt.state_dict(), rng=torch.get_rng_state(), step=7,
                    history=[1])
    want = torch.rand(3)
    fresh = torch.nn.Linear(2, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    assert restore(path, Cfg(), (), "cpu", fresh, fresh_opt) == {"step": 7, "history": [1]}
    assert torch.equal(fresh.weight, model.weight) and torch.equal(torch.rand(3), want)
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    assert restore(str(tmp_path / "none.pt"), Cfg(), (), "cpu", fresh, fresh_opt) is None


def test_run_each_here_or_in_quiet_workers():
    """In this process fn(*task); in worker processes fn(*task, quiet=True); task order kept."""
    tasks = [([("a", 1)],), ([("b", 2)],)]
    assert list(run_each(dict, tasks)) == [{"a": 1}, {"b": 2}]
    assert list(run_each(dict, tasks[:1], jobs=2)) == [{"a": 1}]        # one task: no pool
    assert list(run_each(dict, tasks, jobs=2, threads=1)) == [{"a": 1, "quiet": True},
                                                              {"b": 2, "quiet": True}]


def test_write_results_keeps_the_earlier_one(tmp_path):
    write_results(str(tmp_path), {"runs": [1]})
    write_results(str(tmp_path), {"runs": [2]})                            # rewritten in place
    assert not (tmp_path / "previous_1").exists()
    write_results(str(tmp_path), {"runs": [3]}, keep=True)
    assert json.loads((tmp_path / "previous_1" / "results.json").read_text()) == {"runs": [2]}
    assert json.loads((tmp_path / "results.json").read_text()) == {"runs": [3]}


def test_parse_seeds_and_need():
    assert parse_seeds("0,1,2", 7) == [0, 1, 2] and parse_seeds("", 7) == [7]
    with pytest.raises(BadInput, match="--seeds must be comma-separated integers, got '0,x'"):
        parse_seeds("0,x", 7)
    need(True, "fine")
    with pytest.raises(BadInput, match="^no$"):
        need(False, "no")


def test_heatmap_text_aligns_long_row_names():
    """Short row names: five characters wide, as always; a longer one widens the name column."""
    short = heatmap(np.array([[0.0, 1.0]]), ["in"], ["a", "b"], "t").splitlines()
    assert short == ["t", "        a  b", "   in      @   0.000 1.000",
                     "      (shade: 0.000 -> 1.000)"]
    long = heatmap(np.eye(2), ["latin_open", "x"], ["0", "1"], "t").splitlines()
    assert long[1] == " " * 11 + "  0  1" and long[2].startswith("latin_open   @   ")
    assert long[3].startswith("         x      @")


def test_heatmap_grid_writes_one_png(tmp_path):
    pytest.importorskip("matplotlib")
    plt = pyplot()
    panels = [(np.eye(2), ["a", "b"], ["0", "1"], dict(title="eye")),
              (np.ones((2, 3)) / 2, ["a", "b"], ["x", "y", "z"], dict(xlabel="cols"))]
    path = heatmap_grid(plt, panels, str(tmp_path / "h.png"), label="share", ncols=1,
                        values=".2f", title="two")
    assert path == str(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pool_map_in_task_order_and_worker_threads(monkeypatch):
    assert list(pool_map(pow, [(2, 3), (3, 2), (2, 0)], jobs=2)) == [8, 9, 1]   # spawned processes
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [worker_threads(t, j) for t, j in ((0, 3), (0, 16), (0, 1), (5, 3))] == [2, 1, 8, 5]


# --------------------------------------------------------------------------------------------------
# Runs of a grid

def test_grid_protocol_keeps_the_groups_given_and_extras():
    from data.run import grid_protocol
    p, key = grid_protocol(Cfg(), ("optimisation",), dataset="d")
    assert p == {"epochs": 20, "lr": 0.1, "dataset": "d"} and key == protocol_key(p)
    assert grid_protocol(Cfg(quick=True), ("optimisation",), dataset="d")[1] == key  # other group
    assert grid_protocol(Cfg(lr=0.2), ("optimisation",), dataset="d")[1] != key


def test_run_grid_skips_finished_runs_and_writes_after_each(tmp_path, capsys):
    from data.run import run_grid
    path, calls = str(tmp_path / "results.json"), []

    def one(tag, m, s):
        calls.append((tag, m, s))
        assert len(load_results(path)["runs"]) == len(calls) - 1        # written after each run
        return {"method": m, "seed": s, "acc": 10 * s}
    grid, names = [("a", 1), ("b", 1), ("a", 2)], ("method", "seed")
    label = lambda m, s: f"{m} seed={s}"
    res, mine = run_grid(path, load_results(path), {"lr": 1}, grid[:2], names, one, label)
    assert [(r["method"], r["seed"]) for r in mine] == grid[:2] and calls[0][0] == "[1/2] "
    res, mine = run_grid(path, load_results(path), {"lr": 1}, grid, names, one, label)
    assert calls[-1] == ("[3/3] ", "a", 2) and len(calls) == 3     # the two finished ones kept
    assert "[1/3] a seed=1: finished earlier with protocol" in capsys.readouterr().out
    assert [r["acc"] for r in mine] == [10, 10, 20] and len(res["runs"]) == 3
    res, mine = run_grid(path, load_results(path), {"lr": 2}, grid[:1], names, one, label)
    saved = load_results(path)                                  # another protocol: run again
    assert len(calls) == 4 and len(saved["runs"]) == 4 and len(saved["protocols"]) == 2
    assert [r["protocol"] for r in mine] == [protocol_key({"lr": 2})]


def test_report_results_by_protocol_and_a_missing_file(tmp_path, capsys):
    from data.run import report_results
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": [{"protocol": "k1", "x": 1}, {"protocol": "k2", "x": 2},
                                         {"protocol": "k1", "x": 3}],
                                "protocols": {"k1": {"lr": 1}}}))
    report_results(str(path), lambda runs: "xs " + ",".join(str(r["x"]) for r in runs))
    out = capsys.readouterr().out
    assert 'protocol k1: {"lr": 1}\n\nxs 1,3\n' in out and "protocol k2: {}\n\nxs 2" in out
    with pytest.raises(BadInput, match="no such file"):
        report_results(str(tmp_path / "missing.json"), str)


def test_group_table_rows_columns_and_order():
    from data.run import group_table
    runs = [{"m": m, "r": r, "v": v} for m, r, v in
            (("b", 2, 1.0), ("a", 1, 2.0), ("b", 2, 3.0), ("a", 2, 4.0))]
    cols = [("m", "3", lambda rs: rs[0]["m"]), ("mean", ">6", lambda rs: mean_std(
        [r["v"] for r in rs], ".1f")), ("n", ">2", lambda rs: str(len(rs)))]
    assert group_table(runs, ("m", "r"), cols) == [                    # first seen first
        "m     mean  n", "b   2.0 ± 1.4  2", "a      2.0  1", "a      4.0  1"]
    assert [ln[:1] for ln in group_table(runs, ("m", "r"), cols, order=lambda k: k)[1:]] == [
        "a", "a", "b"]


def test_text_table_title_rule_and_rows():
    from data.run import text_table
    runs = [{"m": "a", "v": 1}, {"m": "b", "v": 2}, {"m": "a", "v": 3}]
    cols = [("m", "2", lambda rs: rs[0]["m"]), ("n", ">2", lambda rs: str(len(rs)))]
    assert text_table("t1\nt2", runs, ("m",), cols, rule=True) == (
        "t1\nt2\nm   n\n-----\na   2\nb   1")
    assert text_table("t", runs, ("m",), cols, order=lambda k: k[0] != "b") == (
        "t\nm   n\nb   1\na   2")


def test_series_of_a_curve_per_name_in_order_with_its_points():
    from data.run import series_of
    runs = [{"m": m, "x": x, "y": y} for m, x, y in (("b", 1, 2.0), ("a", 2, 3.0), ("b", 3, 4.0))]
    assert series_of(runs, "m", "x", "y", ("a", "b", "c")) == {"a": [(2, 3.0)],
                                                               "b": [(1, 2.0), (3, 4.0)]}


def test_open_results_makes_out_and_refuses_a_bad_results_json(tmp_path):
    from data.run import open_results
    path, res, _ = open_results(str(tmp_path / "new"), "ckpt")
    assert path == str(tmp_path / "new" / "results.json") and res == {"runs": []}
    assert (tmp_path / "new" / "ckpt").is_dir()
    (tmp_path / "new" / "results.json").write_text("not json")
    with pytest.raises(BadInput, match="not readable JSON"):
        open_results(str(tmp_path / "new"))


def test_parse_choices_names_the_first_unknown_item():
    from data.run import parse_choices
    assert parse_choices("a,c", ("a", "b", "c"), "methods") == ["a", "c"]
    with pytest.raises(BadInput, match=r"^--methods: unknown method 'x' \(choose from a, b\)$"):
        parse_choices("a,x,y", ("a", "b"), "methods")


def test_curve_png_means_over_points_that_share_an_x(tmp_path):
    from types import SimpleNamespace
    from data.run import curve_png
    calls, axes = [], {}
    ax = SimpleNamespace(plot=lambda xs, ys, *a, **k: calls.append((k["label"], xs, ys)),
                         set=axes.update, legend=lambda: None)
    fig = SimpleNamespace(tight_layout=lambda: None,
                          savefig=lambda p, **k: open(p, "w").write("png"))
    plt = SimpleNamespace(subplots=lambda **k: (fig, ax), close=lambda f: None)
    path = str(tmp_path / "c.png")
    assert curve_png(plt, path, {"a": [(2, 1.0), (1, 5.0), (2, 3.0)]}, xscale="log") == path
    assert calls == [("a", [1, 2], [5.0, 2.0])] and axes == {"xscale": "log"}


def test_check_ranges_open_and_closed_ends_lists_and_nan():
    import re
    from data.run import check_ranges
    ok = {"q": 1.0, "m": 0.0, "d": -1, "rs": [0.5, 99.0]}
    check_ranges(ok, q="(0, 1]", m="[0, 1)", d="[-1, inf)", rs="(0, 100)")
    for name, v, iv in (("q", 0.0, "(0, 1]"), ("m", 1.0, "[0, 1)"), ("d", -2, "[-1, inf)"),
                        ("rs", [1.0, 100.0], "(0, 100)"), ("q", float("nan"), "(0, 1]"),
                        ("d", float("inf"), "[-1, inf)")):
        with pytest.raises(BadInput, match=re.escape(f"--{name} must be in {iv}, got")):
            check_ranges({**ok, name: v}, **{name: iv})

"""data/runs.py: the command line from a Config (presets, explicit flags win), comma lists, the protocol key and
a results.json that is refused when it is not one. CPU, milliseconds."""
import argparse
import json
from dataclasses import dataclass

import numpy as np
import pytest

from data import digits
from data.common import BadInput
from data.runs import by_protocol, flag, load_results, parse_flags, parse_list, protocol_key


@dataclass
class Cfg:
    quick: bool = flag(False, "small")
    sweep: bool = flag(False, "large")
    epochs: int = flag(20, "epochs", "optimisation")
    lr: float = flag(0.1, "learning rate", "optimisation")
    pool: str = flag("batch", "where from", "method", ("batch", "global"))


PRESETS = [("sweep", {"epochs": 50}), ("quick", {"epochs": 3, "lr": 0.5})]


def parse(argv):
    return parse_flags(Cfg, argparse.ArgumentParser(), argv, PRESETS)


def test_parse_flags_presets_and_explicit_flags():
    assert parse([]) == Cfg()
    assert parse(["--quick"]) == Cfg(quick=True, epochs=3, lr=0.5)
    assert parse(["--quick", "--sweep"]) == Cfg(quick=True, sweep=True, epochs=50, lr=0.5)   # the first preset wins
    assert parse(["--quick", "--epochs", "7"]) == Cfg(quick=True, epochs=7, lr=0.5)         # explicit flags win
    with pytest.raises(SystemExit):
        parse(["--pool", "all"])                                                               # choices
    p = argparse.ArgumentParser()
    parse_flags(Cfg, p, [])
    helps = {a.dest: a.help for a in p._actions}
    assert helps["lr"] == "learning rate (default 0.1)" and helps["quick"] == "small"
    assert [g.title for g in p._action_groups][-3:] == ["run", "optimisation", "method"]


def test_parse_list_and_protocol_key():
    assert parse_list("1, 2,", int, "seeds") == [1, 2]
    for s, msg in (("1,x", "--seeds: cannot parse '1,x'"), (",", "--seeds: empty list")):
        with pytest.raises(BadInput, match=msg):
            parse_list(s, int, "seeds")
    assert protocol_key({"a": 1, "b": [2]}) == protocol_key({"b": [2], "a": 1}) != protocol_key({"a": 2, "b": [2]})
    assert len(protocol_key({})) == 8


def test_load_results_and_by_protocol(tmp_path):
    path = tmp_path / "results.json"
    assert load_results(str(path)) == {"runs": []}
    for text in ("{not json", '{"runs": {}}'):
        path.write_text(text)
        with pytest.raises(BadInput, match="move it away"):
            load_results(str(path))
    res = {"runs": [{"protocol": "b", "x": 1}, {"protocol": "a", "x": 2}, {"protocol": "b", "x": 3}],
           "protocols": {"a": {"lr": 1}}}
    path.write_text(json.dumps(res))
    assert list(by_protocol(load_results(str(path)))) == [("a", {"lr": 1}, [res["runs"][1]]),
                                                          ("b", {}, [res["runs"][0], res["runs"][2]])]


def test_ratio_problem_follows_the_colouring_rounding():
    y = np.repeat(np.arange(10), 30)                       # 30 images per class
    assert digits.ratio_problem(y, [5.0]) is None          # round(1.5) = 2 conflicting images per class
    assert "--ratios 1:" in digits.ratio_problem(y, [5.0, 1.0])   # round(0.3) = 0
    assert digits.ratio_problem(y, [1.0]).endswith("use rho >= 1.67")
    for r in (1.0, 5.0):                                   # the check agrees with what the colouring does
        a = digits.biased_attributes(y, r, np.random.default_rng(0))
        assert ((a != y).sum() == 0) == (digits.ratio_problem(y, [r]) is not None)
    assert "class without images" in digits.ratio_problem(np.zeros(5, int), [50.0])

"""data/multimodal.py: the frozen-LM cache (its config stored, keyed by the building code and the
thread count), the gates that stop a run, the shared width check and --compile. CPU, milliseconds.
"""
import pytest
import torch

from data.multimodal import GateFailed, build_key, cached_lm, gate_or_stop


def test_cached_lm_saves_its_config_and_still_reads_bare_caches(tmp_path):
    from types import SimpleNamespace

    cfg = SimpleNamespace(cache_dir=str(tmp_path), data_dir="", d_model=4)
    calls = []

    def train():
        calls.append(1)
        torch.manual_seed(len(calls))
        return torch.nn.Linear(2, 2)

    args = (None, {"<unk>": 0}, cfg, ["d_model"], "lm", lambda: torch.nn.Linear(2, 2), train,
            torch.device("cpu"))
    a = cached_lm(*args)
    (path,) = tmp_path.glob("lm_*.pt")
    ck = torch.load(path, weights_only=True)
    assert ck["config"] == {"d_model": 4} and ck["vocab"] == {"<unk>": 0}
    b = cached_lm(*args)                                   # loaded, not retrained
    assert len(calls) == 1 and torch.equal(a.weight, b.weight)
    torch.save(a.state_dict(), path)                       # a cache from before configs were stored
    assert torch.equal(cached_lm(*args).weight, a.weight) and len(calls) == 1


def test_build_key_changes_with_the_code_and_the_thread_count():
    import data.t5lm as t5lm
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


def test_build_key_ignores_docstrings_comments_and_line_breaks(tmp_path):
    """Only what the code computes is keyed: re-wrapping a line or rewording a docstring keeps
    a backbone."""
    import importlib.util

    from data.multimodal import code_digest
    srcs = ['def f(x, y):\n    """Doc."""\n    return x + y   # sum\n',
            'def f(x,\n      y):\n    """Other words."""\n    return (x\n            + y)\n',
            'def f(x, y):\n    return x - y\n']
    digests = []
    for i, src in enumerate(srcs):
        path = tmp_path / f"m{i}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"m{i}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        digests.append((code_digest(mod), code_digest(mod.f)))
    assert digests[0] == digests[1] != digests[2]


def test_a_failed_gate_stops_unless_quick_or_ignore_gates(capsys):
    from types import SimpleNamespace as NS
    with pytest.raises(GateFailed, match=(r"failed its gate \(frozen LM text ceiling \(x\): "
                                          r"shape 0.5 -> FAIL\)")):
        gate_or_stop(NS(ignore_gates=False, quick=False), False,
                     "frozen LM text ceiling (x): shape 0.5 -> FAIL")
    for cfg in (NS(ignore_gates=True, quick=False), NS(ignore_gates=False, quick=True)):
        gate_or_stop(cfg, False, "vision encoder: minimal pairs 0.5 -> FAIL")
    gate_or_stop(NS(ignore_gates=False, quick=False), True, "ok -> PASS")
    assert capsys.readouterr().out.count("\n") == 4


def test_the_shared_width_check_comes_first_and_names_the_flags():
    """Heads split --d-model (rope: into pairs) and --vit-dim (the 2-D sin-cos: into fours); both
    files check this in validate_image_and_run, before any other shared check."""
    from types import SimpleNamespace as NS

    from data.multimodal import validate_image_and_run
    from data.run import BadInput
    for widths in (dict(d_model=12, n_head=4, vit_dim=16),      # d_model: not 2 x n_head pairs
                   dict(d_model=16, n_head=2, vit_dim=18),      # vit_dim: not in fours
                   dict(d_model=16, n_head=8, vit_dim=20)):     # vit_dim: not n_head heads
        with pytest.raises(BadInput, match=r"--d-model must be a multiple of 2 x --n-head, "
                                           r"--vit-dim of --n-head and of 4"):
            validate_image_and_run(NS(**widths), encoder_batch=8)


def test_compile_blocks_only_with_compile():
    from types import SimpleNamespace as NS

    from data.multimodal import compile_blocks
    calls = []
    blocks = [NS(compile=lambda i=i: calls.append(i)) for i in range(3)]
    compile_blocks(NS(compile=False), blocks)
    assert calls == []
    compile_blocks(NS(compile=True), blocks)
    assert calls == [0, 1, 2]

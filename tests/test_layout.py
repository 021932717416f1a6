"""The repository's layout holds: no paper file imports another, data/ has no import cycle and
imports no paper file, and each file's --help lists every flag of its Config (one flag builder,
data.run.flag)."""
import ast
import importlib
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPERS = ("moe_testbed", "multimodal_align", "qformer_efficient", "logit_correction")


def imported_modules(path):
    """Top-level module names a file imports ('data.run', 'kernels', 'moe_testbed', ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)   # from data import vision
    return names


def test_no_paper_file_imports_another_and_data_kernels_import_none():
    for path in [ROOT / f"{p}.py" for p in PAPERS] + sorted((ROOT / "data").glob("*.py")) + sorted(
            (ROOT / "kernels").glob("*.py")):
        mine = path.stem
        others = {p for p in PAPERS if p != mine}
        assert not others & imported_modules(path), f"{path.name} imports a paper file"


def test_data_has_no_import_cycle():
    mods = {p.stem for p in (ROOT / "data").glob("*.py") if p.stem != "__init__"}
    graph = {m: {n.split(".")[1] for n in imported_modules(ROOT / "data" / f"{m}.py")
                 if n.startswith("data.") and n.split(".")[1] in mods} for m in mods}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import cycle in data/: " + " -> ".join(path + [m]))
        if state.get(m) is None:
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"
    for m in sorted(mods):
        visit(m, [])


@pytest.mark.parametrize("name", PAPERS + ("kernels.bench",))
def test_help_lists_every_config_field(name, capsys):
    mod = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    shown = [f for f in fields(mod.Config) if f.metadata.get("help") is not None]
    assert len(shown) >= len(fields(mod.Config)) - 1           # at most one hidden (test-only) flag
    for f in shown:
        assert "--" + f.name.replace("_", "-") in out, f"{name} --help lacks --{f.name}"

"""The shapes world: captions and answers agree with the scenes; the on-disk format and its errors."""

import json
import re

import numpy as np
import pytest

from data import shapes
from data.shapes import CELLS, COLOURS, HOLDOUT_PAIRS, ShapesDataError, generate, load_dir, save_dir

CANON = {"box": "square", "disc": "circle", "little": "small", "big": "large"}


def parse_caption(cap):
    """Caption -> set of (shape, colour, size, cell name)."""
    objs = set()
    for size, colour, shape, cell in re.findall(r"a (\w+) (\w+) (\w+) at the ([\w-]+)", cap):
        objs.add((CANON.get(shape, shape), colour, CANON.get(size, size), cell))
    return objs


def test_captions_and_answers_agree_with_scenes():
    ds = generate(300, "train", seed=3)
    for objs, cap, qa in zip(ds["objects"], ds["captions"], ds["qa"]):
        assert parse_caption(cap) == {(s, c, z, CELLS[k]) for s, c, z, k in objs}
        present = {(c, s) for s, c, _, _ in objs}
        for d in qa:
            q, a, t = d["q"], d["a"], d["type"]
            words = [CANON.get(w, w) for w in q.split()]
            if t == "colour":
                shape = words[-2]
                assert [c for s, c, _, _ in objs if s == shape] == [a]
            elif t == "shape":
                colour = words[-3]
                assert [s for s, c, _, _ in objs if c == colour] == [a]
            elif t == "position":
                colour, shape = words[-3], words[-2]
                assert a in [CELLS[k] for s, c, _, k in objs if (c, s) == (colour, shape)]
            elif t == "count":
                assert a == shapes.COUNT_WORDS[len(objs)]
            else:
                colour, shape = words[-3], words[-2]
                assert a == ("yes" if (colour, shape) in present else "no")


def test_objects_are_in_distinct_cells_and_coloured_in_the_image():
    ds = generate(50, "val", seed=0)
    cell = 32 // 3
    for img, objs in zip(ds["images"], ds["objects"]):
        assert len({k for *_, k in objs}) == len(objs)
        for s, c, z, k in objs:
            r, col = divmod(k, 3)
            patch = img[r * cell:(r + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3).astype(int)
            dist = np.abs(patch - np.array(COLOURS[c])).sum(1)
            assert (dist < 60).sum() >= 4                                 # the object is drawn in its colour


def test_holdout_pairs_only_in_holdout_split():
    held = set(HOLDOUT_PAIRS)
    for split in ("train", "val", "test"):
        ds = generate(200, split, seed=1)
        assert not any((c, s) in held for objs in ds["objects"] for s, c, _, _ in objs)
    ds = generate(100, "holdout", seed=1)
    assert all(any((c, s) in held for s, c, _, _ in objs) for objs in ds["objects"])


def test_deterministic_from_seed():
    a, b = generate(20, "train", seed=5), generate(20, "train", seed=5)
    assert np.array_equal(a["images"], b["images"]) and a["captions"] == b["captions"] and a["qa"] == b["qa"]
    assert generate(20, "train", seed=6)["captions"] != a["captions"]


def test_disk_round_trip(tmp_path):
    ds = generate(10, "train", seed=0)
    save_dir(ds, tmp_path, splits=["train"] * 8 + ["val"] * 2)
    got, splits = load_dir(str(tmp_path))
    assert np.array_equal(got["images"], ds["images"]) and got["captions"] == ds["captions"]
    assert got["qa"] == ds["qa"] and splits[-1] == "val"


@pytest.mark.parametrize("damage,word", [
    ("missing_images", "images.npy"),
    ("missing_ann", "annotations.jsonl"),
    ("bad_json", ":3:"),
    ("count", "annotation lines"),
    ("shape", "(N, H, W, 3)"),
    ("no_caption", ":1:"),
])
def test_malformed_dir(tmp_path, damage, word):
    ds = generate(4, "train", seed=0)
    save_dir(ds, tmp_path)
    ann = tmp_path / "annotations.jsonl"
    lines = ann.read_text().splitlines()
    if damage == "missing_images":
        (tmp_path / "images.npy").unlink()
    elif damage == "missing_ann":
        ann.unlink()
    elif damage == "bad_json":
        lines[2] = "{not json"
        ann.write_text("\n".join(lines) + "\n")
    elif damage == "count":
        ann.write_text("\n".join(lines[:3]) + "\n")
    elif damage == "shape":
        np.save(tmp_path / "images.npy", np.zeros((4, 8, 8), np.uint8))
    else:
        lines[0] = json.dumps({"qa": []})
        ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(ShapesDataError, match=re.escape(word)):
        load_dir(str(tmp_path))

"""The shapes world v2: captions and answers agree with the scenes (swapped-binding "no"s
included), the geometry lines up with the patch grid, the data-only baselines against brute force;
the on-disk format."""

import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest

from data import shapes
from data.shapes import (CELLS, COLOURS, HOLDOUT_PAIRS, SHAPES, ShapesDataError, generate, load_dir,
                         parse_caption, save_dir)


def answer_from_scene(objs, q, t):
    """What the scene says, read off the objects (independent of the generator's code paths)."""
    w = q.split()
    if t == "colour":                                     # what colour is the <shape> ?
        return [c for s, c, _, _ in objs if s == w[-2]]
    if t == "shape":                                      # what shape is at the <cell> ?
        return [s for s, _, _, k in objs if CELLS[k] == w[-2]]
    if t == "position":                                   # where is the <colour> <shape> ?
        return [CELLS[k] for s, c, _, k in objs if (c, s) == (w[-3], w[-2])]
    if t == "count":
        return [shapes.COUNT_WORDS[len(objs)]]
    return ["yes" if (w[-3], w[-2]) in {(c, s) for s, c, _, _ in objs} else "no"]


def test_captions_and_answers_agree_with_scenes():
    ds = generate(400, "train", seed=3, images=False)
    swapped = no = 0
    for objs, cap, qa in zip(ds["objects"], ds["captions"], ds["qa"]):
        assert parse_caption(cap) == sorted(objs)
        for d in qa:
            assert answer_from_scene(objs, d["q"], d["type"]) == [d["a"]], (objs, d)
            if d["type"] == "exist" and d["a"] == "no":
                colour, shape = d["q"].split()[-3:-1]
                no += 1
                swapped += (colour in {c for _, c, _, _ in objs}
                            and shape in {s for s, _, _, _ in objs})
        assert {d["type"] for d in qa} >= {"shape", "count", "exist"}
    assert no > 100 and swapped / no >= 0.5           # at least half the "no"s are swapped bindings


def test_answers_are_balanced_within_each_type():
    ds = generate(3000, "test", seed=0, images=False)
    for t in shapes.QUESTION_TYPES:
        n = Counter(d["a"] for qa in ds["qa"] for d in qa if d["type"] == t)
        assert max(n.values()) / min(n.values()) < 1.35, (t, n)


def test_objects_line_up_with_the_patch_grid_and_are_drawn():
    ds = generate(60, "val", seed=0)
    for img, objs in zip(ds["images"], ds["objects"]):
        assert len({k for *_, k in objs}) == len(objs) and 2 <= len(objs) <= 4
        colour_map = np.zeros((48, 48), bool)
        for s, c, z, k in objs:
            r, col = divmod(k, 3)
            cell = img[r * 16:(r + 1) * 16, col * 16:(col + 1) * 16].reshape(-1, 3).astype(int)
            near = (np.abs(cell - np.array(COLOURS[c])).sum(1) < 60).sum()
            assert near >= (20 if z == "small" else 60)   # its colour, at its size, in its cell
            colour_map[r * 16:(r + 1) * 16, col * 16:(col + 1) * 16] = True
        far = (np.abs(img.reshape(-1, 3)[~colour_map.flatten()].astype(int)[:, None] -
                      np.array(list(COLOURS.values()))[None]).sum(-1) < 60).sum()
        assert far == 0                                         # nothing outside the objects' cells


def test_shapes_differ_by_many_pixels_at_every_size():
    for px in (shapes.object_px(48, "small"), shapes.object_px(48, "large")):
        m = shapes._masks(px)
        differ = min((m[a] ^ m[b]).sum() for a, b in itertools.combinations(SHAPES, 2))
        assert differ >= 0.3 * px * px                          # 24 of 64, 68 of 196


def test_holdout_pairs_only_in_holdout_split():
    held = set(HOLDOUT_PAIRS)
    for split in ("train", "val", "test"):
        ds = generate(200, split, seed=1, images=False)
        assert not any((c, s) in held for objs in ds["objects"] for s, c, _, _ in objs)
        assert not any(tuple(d["q"].split()[-3:-1]) in held
                       for qa in ds["qa"] for d in qa if d["type"] == "exist")
    ds = generate(100, "holdout", seed=1, images=False)
    assert all(any((c, s) in held for s, c, _, _ in objs) for objs in ds["objects"])


def test_blind_prior_against_brute_force():
    ref = generate(300, "train", seed=4, images=False)
    test = generate(40, "test", seed=4, images=False)
    got = shapes.baselines(test, ref=ref)
    # brute force: for every test question, scan the whole reference set for the same question and
    # take the most frequent answer (unseen: the type's majority on the test set)
    hits = {}
    for qa in test["qa"]:
        for d in qa:
            votes = Counter(r["a"] for rqa in ref["qa"] for r in rqa if r["q"] == d["q"])
            votes = votes or Counter(x["a"] for tqa in test["qa"] for x in tqa
                                     if x["type"] == d["type"])
            best = min(a for a, v in votes.items() if v == max(votes.values()))
            hits.setdefault(d["type"], []).append(best == d["a"])
    for t, h in hits.items():
        assert got["blind_prior"][t] == pytest.approx(np.mean(h))
    assert got["bag_oracle"]["count"] == 1.0 and got["blind_prior"]["count"] < 0.6


def pairings(objs):
    """Every scene the caption's words allow, as (colour, shape) lists: the shapes in a fixed order,
    each ordering of the colours (objects are drawn i.i.d., so each is as likely), none with a
    hold-out pair (the generator rejects those). Sizes and cells do not matter to any answer's
    chance but position's."""
    shps = [o[0] for o in objs]
    worlds = [list(zip(cols, shps)) for cols in itertools.permutations([o[1] for o in objs])]
    return [w for w in worlds if not set(w) & set(HOLDOUT_PAIRS)]


def exist_chances(pairs, colour, shape):
    """(P(the question is 'is there a <colour> <shape> ?' and the answer yes), the same and no) in
    one scene, read off the question generator's rules."""
    have, banned = set(pairs), set(HOLDOUT_PAIRS)
    yes = 0.5 * pairs.count((colour, shape)) / len(pairs)
    swaps = {(c, s) for c, _ in pairs for _, s in pairs} - have - banned
    absent = {(c, s) for c in COLOURS for s in SHAPES} - have - banned
    p_absent = ((colour, shape) in absent) / len(absent)
    if not swaps:
        return yes, 0.5 * p_absent
    p_swap = ((colour, shape) in swaps) / len(swaps)
    return yes, 0.5 * (shapes.SWAP_NO * p_swap + (1 - shapes.SWAP_NO) * p_absent)


def best_answer_from_words(objs, d):
    """The Bayes answer given the question and the caption's words, from the generator's rules: what
    the fitted majority tables of data/shapes.py estimate."""
    w, t = d["q"].split(), d["type"]
    if t == "count":
        return shapes.COUNT_WORDS[len(objs)]
    if t == "position":                              # any present cell: each is as likely
        return CELLS[min(o[3] for o in objs)]
    if t == "shape":                       # the asked cell holds any of the objects, each as likely
        n = Counter(o[0] for o in objs)
        return max(sorted(n), key=n.get)
    worlds = pairings(objs)
    if t == "colour":
        n = Counter(c for pairs in worlds for c, s in pairs if s == w[-2])
        return max(sorted(n), key=n.get)
    chances = [exist_chances(pairs, w[-3], w[-2]) for pairs in worlds]
    return "yes" if sum(y for y, _ in chances) > sum(n for _, n in chances) else "no"


def test_bag_of_words_oracle_reaches_the_bayes_answer_from_the_words():
    """The fitted oracle (majority tables on 20,000 scenes) against the answer a perfect reader of
    the caption's words would give, computed from the generator's rules: within 0.02 per type on
    2,000 test scenes (measured, fitted / from the rules: colour 0.656 / 0.663, shape 0.518 /
    0.520, position 0.362 / 0.364, exist 0.772 / 0.789; on 3,000 val scenes exist 0.788 / 0.798)."""
    test = generate(2000, "test", seed=3, images=False)
    got = shapes.baselines(test)["bag_oracle"]
    hits = {}
    for objs, qa in zip(test["objects"], test["qa"]):
        for d in qa:
            hits.setdefault(d["type"], []).append(best_answer_from_words(objs, d) == d["a"])
    for t, h in hits.items():
        assert got[t] == pytest.approx(np.mean(h), abs=0.02), t
    assert got["colour"] > 0.6 and got["exist"] > 0.75 and got["count"] == 1.0   # far above blind


def test_binding_controlled_groups_share_words_but_not_scenes():
    ds = shapes.binding_controlled(5, per_group=8, seed=0)
    for g in range(5):
        caps = [c for c, k in zip(ds["captions"], ds["group"]) if k == g]
        assert len(caps) == 8 and len(set(caps)) == 8
        assert len({tuple(sorted(c.split())) for c in caps}) == 1


def test_deterministic_from_seed():
    a, b = generate(20, "train", seed=5), generate(20, "train", seed=5)
    assert (np.array_equal(a["images"], b["images"]) and a["captions"] == b["captions"]
            and a["qa"] == b["qa"])
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

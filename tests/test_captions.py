"""BLEU-4 and the CIDEr-style score (data/captions.py) against hand-computed values."""

import math

import pytest

from data import captions


def test_bleu_identical_is_one():
    same = "a red circle at the top"
    assert captions.bleu4([same], [[same]]) == pytest.approx(1.0)


def test_bleu_hand_computed_precisions():
    """p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2; same length, BP = 1."""
    got = captions.bleu4(["a b c d e"], [["a b c d f"]])
    assert got == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_bleu_brevity_penalty_and_closest_reference():
    """Every n-gram matches; c = 6, the closest reference length is 7 (not 12): BP = exp(1 - 7/6).
    """
    got = captions.bleu4(["the cat sat on the mat"],
                         [["the cat sat on the mat today", "x " * 11 + "x"]])
    assert got == pytest.approx(math.exp(1 - 7 / 6))


def test_bleu_clips_counts_and_is_zero_without_4gram_match():
    """Clipped counts: only one 'a' of 'a a a' matches; no smoothing: no 2-gram match gives 0."""
    assert captions.bleu4(["the the the the"], [["the cat"]]) == 0.0
    want = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert captions.bleu4(["a a a b c d"], [["a b c d e f"]]) == pytest.approx(want)


def test_bleu_is_corpus_level():
    """Counts are summed over sentences before the ratios (not a mean of sentence BLEUs)."""
    got = captions.bleu4(["a b c d e", "v w x y z"], [["a b c d f"], ["v w x y z"]])
    assert got == pytest.approx((9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25)


def test_cider_style():
    """Identical captions score 10; a one-document corpus has idf 0 everywhere; 3-word captions have
    no 4-grams (so 7.5 = 10 x 3/4); no shared n-gram scores 0; a partial match lies in between."""
    refs = [["a red circle at top"], ["a blue square at left"], ["two green crosses in the center"]]
    hyps = ["a red circle at top", "a blue square at left", "two green crosses in the center"]
    assert captions.cider(hyps, refs) == pytest.approx(10.0)
    assert captions.cider(["a red circle"], [["a red circle"]]) == 0.0
    assert captions.cider(["a red circle", "two blue squares"],
                     [["a red circle"], ["two blue squares"]]) == pytest.approx(7.5)
    assert captions.cider(["zzz", "yyy", "xxx"], refs) == 0.0
    part = captions.cider(["a red square at left", "a blue square at left",
                      "two green crosses in the center"], refs)
    assert 0 < part < 10


def test_reference_captions_are_the_caption_and_other_object_orders():
    """The procedural world: the scene's caption first, then n - 1 more of the same objects in other
    orders; data without objects (--data-dir) has its one caption."""
    from data.shapes import generate, parse_caption, reference_captions

    ds = generate(20, "test", seed=3, images=False)
    refs = reference_captions(ds, n=4)
    assert len(refs) == 20 and all(len(r) == 4 for r in refs)
    assert [r[0] for r in refs] == ds["captions"]
    assert all(parse_caption(x) == parse_caption(r[0]) for r in refs for x in r)
    assert any(len(set(r)) > 1 for r in refs)                     # other orders, not copies
    assert reference_captions(dict(captions=["a b", "c d"])) == [["a b"], ["c d"]]

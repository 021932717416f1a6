"""Tests for data/domains.py: procedural languages, the real-text reader, batches."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.domains import (DataError, LANGUAGES, check_lengths, synthetic_domains,  # noqa: E402
                          text_domains, train_batch, val_windows)

SMALL = dict(train_bytes=20_000, val_bytes=4_000)


def test_synthetic_is_deterministic_balanced_and_valid_utf8():
    from data import domains as dm
    a = synthetic_domains(seed=3, overlap=0.1, **SMALL)
    assert len(a.names) == len(LANGUAGES) == 8
    assert all(len(t) == 20_000 for t in a.train) and all(len(v) == 4_000 for v in a.val)
    dm._SYNTH_CACHE.clear()                                  # regenerate from scratch: same bytes
    c = synthetic_domains(seed=3, overlap=0.1, **SMALL)
    assert all(np.array_equal(x, y) for x, y in zip(a.train + a.val, c.train + c.val))
    for t in a.train:                                      # valid UTF-8 up to the cut at the budget
        text = bytes(t).decode("utf-8", "ignore")
        assert len(text.encode("utf-8")) >= len(t) - 3


def test_scripts_differ_in_bytes_and_latin_languages_share_a_script():
    d = synthetic_domains(seed=0, overlap=0.0, **SMALL)
    sets = {n: set(np.unique(t).tolist()) for n, t in zip(d.names, d.train)}
    assert max(sets["kana"]) >= 0xE3 and max(sets["latin_open"]) < 0x80       # 3-byte vs pure ASCII
    assert 0xCE in sets["greek"] and 0xCE not in sets["cyrillic"]             # different lead bytes
    letters = lambda s: {b for b in s if 97 <= b <= 122}
    assert letters(sets["latin_open"]) & letters(sets["latin_cluster"])       # shared Latin letters


def test_overlap_knob_shares_words():
    def words(overlap):
        d = synthetic_domains(seed=0, overlap=overlap, **SMALL)
        return [set(bytes(t).decode("utf-8", "ignore").split()) for t in d.train]
    w0, w1 = words(0.0), words(0.5)
    shared = lambda ws: len(ws[3] & ws[4])                                      # greek vs cyrillic
    assert shared(w1) > 5 * max(1, shared(w0))


def test_train_batch_one_domain_per_sequence_balanced_and_stateless():
    d = synthetic_domains(seed=0, overlap=0.1, **SMALL)
    x, y, dom = train_batch(d, 16, 32, seed=1, step=5)
    assert x.shape == y.shape == (16, 32) and (x[:, 1:] == y[:, :-1]).all()
    assert np.bincount(dom, minlength=8).tolist() == [2] * 8
    for b in range(16):                               # the window really is in that domain's stream
        s = d.train[dom[b]]
        hits = np.flatnonzero(s[:len(s) - 32] == x[b, 0])
        assert any((s[h:h + 32] == x[b]).all() for h in hits)
    x2, _, dom2 = train_batch(d, 16, 32, seed=1, step=5)
    assert (x2 == x).all() and (dom2 == dom).all()


def test_val_windows_interleave_domains():
    d = synthetic_domains(seed=0, overlap=0.1, **SMALL)
    x, y, dom = val_windows(d, 64, 3)
    assert x.shape == (24, 64) and dom[:8].tolist() == list(range(8))


def _write(root, domains):
    for name, files in domains.items():
        (root / name).mkdir(parents=True)
        for fn, text in files.items():
            (root / name / fn).write_text(text, encoding="utf-8")


def test_text_reader_split_balance_and_cache(tmp_path):
    docs_a = [f"alpha document {i} " * 5 for i in range(60)]
    docs_b = [f"βήτα κείμενο {i} " * 9 for i in range(40)]
    _write(tmp_path / "d", {"a": {"1.txt": "\n\n".join(docs_a[:30]),
                                  "2.txt": "\n\n".join(docs_a[30:])},
                            "b": {"x.txt": "\n\n".join(docs_b)}, "empty": {}})
    cache = tmp_path / "cache"
    d = text_domains(str(tmp_path / "d"), cache_dir=str(cache))
    assert d.names == ["a", "b"]                                  # a folder without .txt is skipped
    assert len(d.train[0]) == len(d.train[1]) and len(d.val[0]) == len(d.val[1])  # by tokens
    val_text = bytes(d.val[0]).decode("utf-8", "ignore")
    train_text = bytes(d.train[0]).decode("utf-8", "ignore")
    val_docs = {p.strip() for p in val_text.split("\n\n") if p.strip()}
    # split by document
    assert val_docs and not any(v in train_text.split("\n\n") for v in list(val_docs)[:-1])
    assert len(list(cache.glob("*.npy"))) == 4
    d2 = text_domains(str(tmp_path / "d"), cache_dir=str(cache))                    # from the cache
    assert all(np.array_equal(p, q) for p, q in zip(d.train + d.val, d2.train + d2.val))


def test_text_reader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        text_domains(str(tmp_path / "missing"))
    _write(tmp_path / "one", {"a": {"1.txt": "hello\n\nworld"}})
    with pytest.raises(DataError, match="at least 2"):
        text_domains(str(tmp_path / "one"))
    _write(tmp_path / "bad", {"a": {"1.txt": "hello\n\nthere\n\nworld"}, "b": {"1.txt": "x"}})
    (tmp_path / "bad" / "b" / "1.txt").write_bytes(b"\xc3\x28")
    with pytest.raises(DataError, match="UTF-8"):
        text_domains(str(tmp_path / "bad"))
    d = synthetic_domains(seed=0, overlap=0.1, **SMALL)
    with pytest.raises(DataError, match="longer than the data"):
        check_lengths(d, 10_000)


def test_train_batch_by_domain_is_the_same_batch_sorted():
    d = synthetic_domains(seed=0, overlap=0.1, **SMALL)
    x, _, dom = train_batch(d, 16, 32, seed=1, step=5)
    xs, _, doms_ = train_batch(d, 16, 32, seed=1, step=5, by_domain=True)
    assert doms_.tolist() == sorted(dom.tolist())                       # rows 2k, 2k+1: domain k
    assert sorted(map(bytes, xs)) == sorted(map(bytes, x))

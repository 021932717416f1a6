"""data/digits.py: procedural digits, the IDX reader, and the LfF colouring protocol."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import digits  # noqa: E402


def test_procedural_digits_deterministic_and_in_range():
    x1, y1 = digits.procedural_split(60, seed=3)
    x2, y2 = digits.procedural_split(60, seed=3)
    x3, _ = digits.procedural_split(60, seed=4)
    assert x1.shape == (60, 28, 28) and x1.dtype == np.float32
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert x1.min() >= 0 and x1.max() <= 1
    assert np.bincount(y1, minlength=10).tolist() == [6] * 10          # balanced labels
    ink = (x1 > 0.3).mean((1, 2))
    assert (ink > 0.03).all() and (ink < 0.5).all()           # every image has a stroke, not a blob
    assert (x1[:, 0, :] == 0).mean() > 0.9                         # background (border) stays black


def test_procedural_classes_differ_more_than_samples_within():
    """Shape carries the label: class means are far apart relative to within-class spread."""
    x, y = digits.procedural_split(400, seed=0)
    x = x.reshape(len(x), -1)
    means = np.stack([x[y == k].mean(0) for k in range(10)])
    nearest = np.array([np.argmin(((means - xi) ** 2).sum(1)) for xi in x])
    assert (nearest == y).mean() > 0.6                             # nearest class mean, no training


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0, 5.0, 37.0])
def test_biased_colouring_has_exact_conflicting_fraction(ratio):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=5003)
    attr = digits.biased_attributes(y, ratio, np.random.default_rng(1))
    for k in range(10):
        n_k = (y == k).sum()
        conf = attr[y == k] != k
        assert conf.sum() == int(round(ratio / 100 * n_k))
        # conflicting colours are spread evenly over the 9 other colours (counts differ by <= 1)
        c = np.bincount(attr[y == k][conf], minlength=10)
        others = c[np.arange(10) != k]
        assert c[k] == 0 and (c.sum() == 0 or others.max() - others.min() <= 1)


def test_uniform_colouring_is_balanced_and_images_keep_black_background():
    y = np.repeat(np.arange(10), 50)
    attr = digits.uniform_attributes(y, np.random.default_rng(0))
    cells = np.zeros((10, 10), int)
    np.add.at(cells, (y, attr), 1)
    assert (cells == 5).all()
    grey = np.zeros((3, 28, 28), np.float32)
    grey[:, 10:15, 10:15] = 1.0
    x = digits.apply_colour(grey, np.array([0, 3, 9]), np.random.default_rng(0))
    assert x.shape == (3, 3, 28, 28)
    assert (x[:, :, 0, 0] == 0).all()                                  # background black
    assert np.allclose(x[:, :, 12, 12], digits.COLOURS[[0, 3, 9]], atol=0.15)   # colour + jitter


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    digits.write_idx(tmp_path / f"i{suffix}", imgs)
    digits.write_idx(tmp_path / f"l{suffix}", labels)
    assert np.array_equal(digits.read_idx(str(tmp_path / f"i{suffix}")), imgs)
    assert np.array_equal(digits.read_idx(str(tmp_path / f"l{suffix}")), labels)
    # the header by hand: magic 0x00000803, then 3 big-endian uint32 sizes
    if not suffix:
        raw = (tmp_path / "i").read_bytes()
        assert (raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 7, 0, 0, 0, 28, 0, 0, 0, 28])
                and len(raw) == 16 + 7 * 784)


def write_mnist_dir(d, n_train=60, n_test=30, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    s = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        digits.write_idx(d / f"{split}-images-idx3-ubyte{s}",
                         rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        digits.write_idx(d / f"{split}-labels-idx1-ubyte{s}",
                         rng.integers(0, 10, n, dtype=np.uint8))


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dataset(tmp_path, gz):
    write_mnist_dir(tmp_path, gz=gz)
    tx, ty, sx, sy = digits.load_idx_dataset(str(tmp_path))
    assert tx.shape == (60, 28, 28) and sx.shape == (30, 28, 28)
    assert ty.shape == (60,) and sy.shape == (30,)
    assert tx.dtype == np.float32 and 0 <= tx.min() and tx.max() <= 1


def test_idx_errors(tmp_path):
    write_mnist_dir(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte"
    raw = bad.read_bytes()
    bad.write_bytes(b"\x12\x34" + raw[2:])                              # corrupt magic
    with pytest.raises(digits.IDXError, match="magic"):
        digits.load_idx_dataset(str(tmp_path))
    bad.write_bytes(raw[:-3])                                            # truncated data
    with pytest.raises(digits.IDXError, match="header promises"):
        digits.load_idx_dataset(str(tmp_path))
    digits.write_idx(bad, np.zeros(59, np.uint8))                        # 60 images, 59 labels
    with pytest.raises(digits.IDXError, match="60 images but 59 labels"):
        digits.load_idx_dataset(str(tmp_path))
    bad.unlink()
    with pytest.raises(digits.IDXError, match="missing train-labels"):
        digits.load_idx_dataset(str(tmp_path))


def test_palette_is_well_separated_and_jitter_is_lffs():
    c = digits.COLOURS
    assert c.shape == (10, 3) and len({tuple(v) for v in c.round(3)}) == 10
    d = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
    assert d[~np.eye(10, dtype=bool)].min() > 0.4   # a hand-picked palette's orange/brown: 0.37
    # colour direction matters, not brightness (strokes have random contrast): normalised
    # colours stay apart too
    u = c / np.linalg.norm(c, axis=1, keepdims=True)
    angle = np.degrees(np.arccos(np.clip(u @ u.T, -1, 1)))
    assert angle[~np.eye(10, dtype=bool)].min() > 20
    assert digits.JITTER == 0.005                                     # LfF's Colored MNIST severity
    x = digits.apply_colour(np.ones((2000, 28, 28), np.float32), np.ones(2000, int),
                            np.random.default_rng(0))
    assert x[:, 1, 0, 0].std() == pytest.approx(0.005, rel=0.1)    # orange's green, 0.6 +- 0.005
    assert abs(x[:, 1, 0, 0].mean() - digits.COLOURS[1, 1]) < 0.001


def test_idx_parent_folder_layouts(tmp_path):
    write_mnist_dir_nested = tmp_path / "MNIST" / "raw"
    write_mnist_dir_nested.mkdir(parents=True)
    (tmp_path / "MNIST" / "processed").mkdir()
    write_mnist_dir(write_mnist_dir_nested, gz=True)
    assert digits.find_idx_dir(str(tmp_path)) == str(write_mnist_dir_nested)
    tx, ty, sx, sy = digits.load_idx_dataset(str(tmp_path))         # two levels up still finds raw/
    assert tx.shape == (60, 28, 28) and sy.shape == (30,)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(digits.IDXError, match="missing train-images"):
        digits.load_idx_dataset(str(empty))


def test_cached_procedural_split_is_identical_on_reload(tmp_path):
    x1, y1 = digits.procedural_split_cached(40, 5, str(tmp_path))
    x2, y2 = digits.procedural_split_cached(40, 5, str(tmp_path))
    xr, yr = digits.procedural_split(40, 5)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(y1, yr)
    assert x1.dtype == np.float32 and np.abs(x1 - xr).max() <= 0.5 / 255 + 1e-6  # uint8 rounding


def test_ratio_problem_follows_the_colouring_rounding():
    y = np.repeat(np.arange(10), 30)                       # 30 images per class
    assert digits.ratio_problem(y, [5.0]) is None      # round(1.5) = 2 conflicting images per class
    assert "--ratios 1:" in digits.ratio_problem(y, [5.0, 1.0])   # round(0.3) = 0
    assert digits.ratio_problem(y, [1.0]).endswith("use rho >= 1.67")
    for r in (1.0, 5.0):                             # the check agrees with what the colouring does
        a = digits.biased_attributes(y, r, np.random.default_rng(0))
        assert ((a != y).sum() == 0) == (digits.ratio_problem(y, [r]) is not None)
    assert "class without images" in digits.ratio_problem(np.zeros(5, int), [50.0])

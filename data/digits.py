"""Digits for the spurious-correlation experiments: procedural grey digits, an MNIST-format IDX
reader, and the LfF colouring protocol (Nam et al. 2020, "Learning from Failure").

Shapes: N = images, H = W = 28, C = 3 colour channels. Grey images are float32 in [0, 1],
(N, 28, 28).

- `render_digits(labels, seed)`   procedural handwritten-looking digits: stroke templates
  (polylines and arcs) -> smooth random warp -> random affine (rotation, shear, scale, shift) ->
  stroke of random width -> pixel noise. Deterministic from the seed, any number of samples, numpy
  only.
- `read_idx(path)` / `load_idx_dataset(dir)`   MNIST/Fashion-MNIST/KMNIST files (optionally .gz),
  in dir or a subfolder of it (raw/, MNIST/raw/).
- `colour_biased(grey, y, ratio, rng)`  train split: fraction 1-rho of each class gets its own
  colour, exactly round(rho * n_y) samples get one of the other 9 colours (spread evenly over
  them).
- `colour_uniform(grey, y, rng)`  validation/test: every (class, colour) cell equally often.
- `procedural_split_cached(n, seed, cache_dir)`  the same digits as uint8, rendered once and cached.
- `grey_splits`, `coloured_eval`, `coloured_train`  logit_correction.py's train/val/test splits,
  seeds included; `ratio_problem` refuses a ratio that leaves a class without conflicting images;
  `samples_figure` shows them.
"""
import gzip
import os

import numpy as np

H = W = 28

# --------------------------------------------------------------------------------------------------
# Procedural digits. Templates live in a unit box, x to the right, y downwards.

def _arc(cx, cy, rx, ry, deg0, deg1, n=14):
    """Points on an ellipse arc; angle 90 deg points down (image coordinates), 270 deg points up."""
    t = np.deg2rad(np.linspace(deg0, deg1, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _line(*pts):
    return np.array(pts, dtype=np.float64)


# each digit: a list of strokes, each stroke an (P, 2) polyline of control points in [0, 1]^2
TEMPLATES = {
    0: [_arc(0.5, 0.5, 0.27, 0.39, 0, 360, 20)],
    1: [_line((0.38, 0.24), (0.52, 0.1), (0.52, 0.9))],
    2: [np.concatenate([_arc(0.5, 0.33, 0.23, 0.22, 190, 395), _line((0.24, 0.9), (0.8, 0.9))])],
    3: [_arc(0.48, 0.3, 0.22, 0.19, 205, 450), _arc(0.48, 0.68, 0.25, 0.21, 270, 515)],
    4: [_line((0.6, 0.1), (0.2, 0.64), (0.82, 0.64)), _line((0.62, 0.35), (0.62, 0.9))],
    5: [np.concatenate([_line((0.76, 0.1), (0.33, 0.1), (0.3, 0.47)),
                        _arc(0.5, 0.66, 0.25, 0.22, 225, 510)])],
    6: [np.concatenate([_line((0.7, 0.1), (0.42, 0.35), (0.29, 0.62)),
                        _arc(0.5, 0.68, 0.21, 0.2, 180, 540, 18)])],
    7: [_line((0.2, 0.12), (0.8, 0.12), (0.42, 0.9))],
    8: [_arc(0.5, 0.3, 0.18, 0.19, 0, 360, 16), _arc(0.5, 0.7, 0.23, 0.2, 0, 360, 16)],
    9: [_arc(0.5, 0.32, 0.2, 0.19, 0, 360, 16), _line((0.7, 0.32), (0.6, 0.9))],
}


def _segments(digit):
    """All segments of a template as (S, 2, 2): segment s runs from [s, 0] to [s, 1]."""
    segs = [np.stack([s[:-1], s[1:]], 1) for s in TEMPLATES[digit]]
    return np.concatenate(segs, 0)


def _render_class(digit, n, rng, chunk=256):
    """n images of one digit, (n, 28, 28) float32."""
    seg = _segments(digit)                                     # (S, 2, 2)
    S = seg.shape[0]
    p = seg.reshape(1, S * 2, 2).repeat(n, 0)                  # (n, 2S, 2) segment endpoints
    # smooth random warp: two random sinusoids per axis -> every image is a different "hand"
    for _ in range(2):
        f = rng.normal(0, 2.0, size=(n, 2, 2))          # (n, axis_out, axis_in) spatial frequencies
        ph = rng.uniform(0, 2 * np.pi, size=(n, 1, 2))
        amp = rng.uniform(0.0, 0.05, size=(n, 1, 2))
        p = p + amp * np.sin(2 * np.pi * np.einsum("npi,noi->npo", p, f) + ph)
    # random affine about the box centre: rotation, shear, anisotropic scale, then placing on 28x28
    rot = np.deg2rad(rng.uniform(-15, 15, n))
    shear = rng.uniform(-0.3, 0.3, n)
    sx, sy = rng.uniform(0.75, 1.05, n), rng.uniform(0.8, 1.05, n)
    c, s = np.cos(rot), np.sin(rot)
    A = np.stack([np.stack([c, -s], 1), np.stack([s, c], 1)], 1)           # (n, 2, 2) rotation
    Sh = np.zeros((n, 2, 2)); Sh[:, 0, 0] = 1; Sh[:, 1, 1] = 1; Sh[:, 0, 1] = shear
    Sc = np.zeros((n, 2, 2)); Sc[:, 0, 0] = sx; Sc[:, 1, 1] = sy
    M = A @ Sh @ Sc * 20.0                                                # unit box -> ~20 px digit
    shift = 13.5 + rng.uniform(-2, 2, size=(n, 1, 2))
    p = np.einsum("nij,npj->npi", M, p - 0.5) + shift                     # (n, 2S, 2) in pixels
    p = p.reshape(n, S, 2, 2).astype(np.float32)
    width = rng.uniform(1.0, 2.6, n).astype(np.float32)                    # stroke width in pixels
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    pix = np.stack([xx.ravel(), yy.ravel()], 1)                            # (784, 2) pixel centres
    out = np.empty((n, H * W), np.float32)
    for i in range(0, n, chunk):
        a, b = p[i:i + chunk, :, 0], p[i:i + chunk, :, 1]                  # (c, S, 2) segment ends
        ab = b - a
        ap = pix[None, :, None, :] - a[:, None]                            # (c, 784, S, 2)
        t = np.clip((ap * ab[:, None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6)[:, None], 0, 1)
        d = np.linalg.norm(ap - t[..., None] * ab[:, None], axis=-1).min(-1)   # (c, 784) to stroke
        # anti-aliased stroke: 1 inside half the width, linear fall-off over one pixel
        out[i:i + chunk] = np.clip(width[i:i + chunk, None] / 2 + 0.5 - d, 0, 1)
    contrast = rng.uniform(0.6, 1.0, size=(n, 1)).astype(np.float32)
    noise = rng.normal(0, 0.15, size=out.shape).astype(np.float32)
    out = np.clip(out * contrast + noise * (out > 0), 0, 1)               # noise on the stroke only
    return out.reshape(n, H, W)


def render_digits(labels, seed):
    """Grey digits for `labels`, (N, 28, 28) float32 in [0, 1]; deterministic from `seed`."""
    labels = np.asarray(labels)
    out = np.zeros((len(labels), H, W), np.float32)
    for k in range(10):
        idx = np.nonzero(labels == k)[0]
        if len(idx):  # a generator per (seed, class): a class's images don't depend on the others
            out[idx] = _render_class(k, len(idx), np.random.default_rng([seed, k]))
    return out


def procedural_split(n, seed):
    """n balanced, shuffled labels and their images."""
    rng = np.random.default_rng([seed, 10])
    y = rng.permutation(np.arange(n) % 10).astype(np.int64)
    return render_digits(y, seed), y


# --------------------------------------------------------------------------------------------------
# MNIST-format IDX files: big-endian magic (0, 0, dtype, ndim), ndim uint32 sizes, then uint8 data.

IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


class IDXError(ValueError):
    """A missing, truncated or malformed IDX file (reported as a one-line error by the scripts)."""


def read_idx(path):
    """Read one uint8 IDX file (plain or .gz) into a numpy array. Never unpickles anything."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise IDXError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise IDXError(f"{path}: only unsigned-byte IDX data is supported "
                       f"(type code 0x{raw[2]:02x})")
    ndim = raw[3]
    if ndim not in (1, 3) or len(raw) < 4 + 4 * ndim:
        raise IDXError(f"{path}: expected 1 or 3 dimensions, header says {ndim}")
    dims = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) != 4 + 4 * ndim + size:
        raise IDXError(f"{path}: header promises {dims} = {size} bytes, "
                       f"file holds {len(raw) - 4 - 4 * ndim}")
    return np.frombuffer(raw, np.uint8, count=size, offset=4 + 4 * ndim).reshape(dims)


def _find(data_dir, name):
    for cand in (name, name + ".gz",
                 name.replace("-idx", ".idx"), name.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(data_dir, cand)
        if os.path.isfile(p):
            return p
    return None


def find_idx_dir(data_dir, depth=2):
    """The folder that holds the IDX files: data_dir itself, or the first subfolder (sorted, up to
    `depth` levels down) that does -- e.g. torchvision's MNIST/raw/ layout, or a raw/ folder next
    to processed/."""
    if _find(data_dir, IDX_FILES["train_x"]):
        return data_dir
    if depth > 0:
        for sub in sorted(os.listdir(data_dir)):
            p = os.path.join(data_dir, sub)
            if os.path.isdir(p):
                found = find_idx_dir(p, depth - 1)
                if found:
                    return found
    return None


def load_idx_dataset(data_dir):
    """(train_x, train_y, test_x, test_y) from an MNIST-format folder (or a parent of one, see
    find_idx_dir); images float32 in [0, 1] (N, 28, 28)."""
    if not os.path.isdir(data_dir):
        raise IDXError(f"--data-dir {data_dir}: not a directory")
    root = find_idx_dir(data_dir) or data_dir
    paths = {}
    for k, v in IDX_FILES.items():
        paths[k] = _find(root, v)
        if paths[k] is None:
            raise IDXError(f"--data-dir {data_dir}: missing {v} (or {v}.gz), "
                           "also in its subfolders")
    arrs = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrs[split + "_x"], arrs[split + "_y"]
        if x.ndim != 3 or x.shape[1:] != (H, W):
            raise IDXError(f"--data-dir {data_dir}: {split} images must be N x 28 x 28, "
                           f"got {x.shape}")
        if y.ndim != 1:
            raise IDXError(f"--data-dir {data_dir}: {split} labels must be 1-D, got {y.shape}")
        if len(x) != len(y):
            raise IDXError(f"--data-dir {data_dir}: {split} has {len(x)} images "
                           f"but {len(y)} labels")
        if len(y) and y.max() > 9:
            raise IDXError(f"--data-dir {data_dir}: {split} labels must be 0..9, "
                           f"found {int(y.max())}")
    f = lambda x: x.astype(np.float32) / 255.0
    return (f(arrs["train_x"]), arrs["train_y"].astype(np.int64),
            f(arrs["test_x"]), arrs["test_y"].astype(np.int64))


def write_idx(path, arr):
    """Write a uint8 array as an IDX file (plain, or gzip when the name ends in .gz); for the
    tests."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(raw)


# --------------------------------------------------------------------------------------------------
# Colouring (LfF protocol): grey digit x class colour, small per-image jitter, black background.

def _hue_palette(n=10):
    """n fully saturated colours with hues 360/n degrees apart
    (0 = red, 36 = orange, ..., 324 = pink)."""
    h = np.arange(n) / n * 6.0                                             # hue in sextants
    rgb = np.clip(np.abs((h[:, None] + np.array([0.0, 4.0, 2.0])) % 6.0 - 3.0) - 1.0, 0, 1)
    return rgb.astype(np.float32)


# LfF's Colored MNIST (Nam et al. 2020, data/colored_mnist_protocol.py) multiplies the digit by one
# of 10 mean colours plus N(0, std^2) per image and channel, std = 0.005 at the severity their paper
# (and DisEnt, LC) use. Their colours ship as a binary file, so we pick our own ten, as far apart as
# a hue circle allows: 36 degrees between neighbours (RGB distance >= 0.44), against 4.9 degrees for
# the closest pair of the hand-picked palette this replaced.
COLOURS = _hue_palette(10)   # (10, 3), attribute a = colour index
JITTER = 0.005


def apply_colour(grey, attr, rng, jitter=JITTER):
    """(N, 28, 28) grey, (N,) colour ids -> (N, 3, 28, 28) float32;
    colour + N(0, jitter) per image."""
    col = COLOURS[attr] + rng.normal(0, jitter, size=(len(attr), 3)).astype(np.float32)
    col = np.clip(col, 0, 1)
    return grey[:, None] * col[:, :, None, None]                           # (N, 3, H, W)


def biased_attributes(y, ratio, rng):
    """Colour ids for a biased split: in class k exactly round(ratio/100 * n_k) samples are
    bias-conflicting, their colours cycling evenly through the 9 other colours (in a random order);
    the rest get colour k."""
    y = np.asarray(y)
    attr = y.copy()
    for k in range(10):
        idx = np.nonzero(y == k)[0]
        n_conf = int(round(ratio / 100.0 * len(idx)))
        conf = rng.choice(idx, size=n_conf, replace=False)
        others = rng.permutation([c for c in range(10) if c != k])
        attr[conf] = others[np.arange(n_conf) % 9]
    return attr


def uniform_attributes(y, rng):
    """Colour ids for an unbiased split: inside every class the 10 colours occur equally
    often (+-1)."""
    y = np.asarray(y)
    attr = np.empty_like(y)
    for k in range(10):
        idx = np.nonzero(y == k)[0]
        attr[idx] = rng.permutation(np.arange(len(idx)) % 10)
    return attr


def colour_biased(grey, y, ratio, rng):
    attr = biased_attributes(y, ratio, rng)
    return apply_colour(grey, attr, rng), attr


def colour_uniform(grey, y, rng):
    attr = uniform_attributes(y, rng)
    return apply_colour(grey, attr, rng), attr


def procedural_split_cached(n, seed, cache_dir):
    """procedural_split quantised to uint8 like real MNIST, cached as an .npz in cache_dir
    (rendering 70k images takes about a minute). The first call and every later call return
    identical arrays."""
    path = os.path.join(cache_dir, f"digits_n{n}_seed{seed}.npz")
    if not os.path.exists(path):
        x, y = procedural_split(n, seed)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, x=np.round(x * 255).astype(np.uint8), y=y)
        os.replace(tmp, path)
    with np.load(path, allow_pickle=False) as f:
        return f["x"].astype(np.float32) / 255.0, f["y"].astype(np.int64)


# --------------------------------------------------------------------------------------------------
# The splits of logit_correction.py's protocol: grey digits once (cached), val/test coloured once,
# the training split coloured per (ratio, seed). Every seed below is part of the protocol:
# keep them.

def grey_splits(data_dir, n_train, n_val, n_test, data_seed, cache_dir):
    """dict of train/val/test grey images (N, 28, 28) and labels (N,). IDX data: n_val images held
    out of the training file (a data_seed permutation), the test file as it is; else procedural,
    cached in cache_dir."""
    if data_dir:
        tx, ty, sx, sy = load_idx_dataset(data_dir)
        if len(tx) <= n_val:
            raise IDXError(f"--data-dir {data_dir}: {len(tx)} training images, "
                           f"need more than --n-val {n_val}")
        perm = np.random.default_rng(data_seed).permutation(len(tx))
        tr, va = perm[n_val:], perm[:n_val]
        return dict(train_x=tx[tr], train_y=ty[tr], val_x=tx[va], val_y=ty[va],
                    test_x=sx, test_y=sy)
    d = {}
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        d[split + "_x"], d[split + "_y"] = procedural_split_cached(n, data_seed * 1000 + i,
                                                                   cache_dir)
    return d


def coloured_eval(grey, data_seed):
    """{"val": (x, y, a), "test": (x, y, a)}: every colour equally often in every class;
    x (n, 3, 28, 28)."""
    out = {}
    for i, split in enumerate(("val", "test")):
        x, a = colour_uniform(grey[split + "_x"], grey[split + "_y"],
                              np.random.default_rng([data_seed, 100 + i]))
        out[split] = (x, grey[split + "_y"], a)
    return out


def coloured_train(grey, ratio, seed):
    """The biased training split for one (ratio %, seed): x (N, 3, 28, 28), y (N,), true
    colour a (N,)."""
    rng = np.random.default_rng([seed, int(round(ratio * 1000)), 7])
    x, a = colour_biased(grey["train_x"], grey["train_y"], ratio, rng)
    return x, grey["train_y"], a


def ratio_problem(y, ratios):
    """None, or why a ratio (%) is too small for labels y: biased_attributes gives class k
    round(ratio/100 * n_k) bias-conflicting images, so the smallest class would get none (or a class
    has no image at all)."""
    n_min = int(np.bincount(y, minlength=10).min())
    if n_min == 0:
        return f"the training split has a class without images ({len(y)} images); use more of them"
    for r in ratios:
        if round(r / 100 * n_min) == 0:
            return (f"--ratios {r:g}: the smallest class has {n_min} training images, "
                    f"so {r:g} % gives it no bias-conflicting image; "
                    f"use rho >= {100 * 0.5 / n_min:.3g}")
    return None


def samples_figure(x, y, a, title, plt):
    """What the nets see: per class the first bias-aligned image (top row: the class's own colour)
    and the first bias-conflicting one (bottom row: another colour), titled digit y / colour a.
    plt: matplotlib.pyplot."""
    fig, axes = plt.subplots(2, 10, figsize=(10, 2.8))
    for k in range(10):
        for row, mask in enumerate(((y == k) & (a == k), (y == k) & (a != k))):
            ax, i = axes[row, k], np.flatnonzero(mask)
            ax.set(xticks=[], yticks=[])
            if len(i):
                ax.imshow(x[i[0]].transpose(1, 2, 0))
                ax.set_title(f"y={k} a={int(a[i[0]])}", fontsize=8)
    axes[0, 0].set_ylabel("aligned")
    axes[1, 0].set_ylabel("conflicting")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig

"""The shapes world: procedural image-text data for the multimodal papers (multimodal_align.py,
qformer_efficient.py), deterministic from a seed, plus a plain on-disk format for real data.

A scene is a small RGB image (32x32 by default) on a lightly textured background with 1-3 objects.
Each object has a shape, a colour, a size and a cell of a 3x3 grid (no two objects share a cell, so
they never overlap). Every scene comes with
  - a caption: templated, with synonyms and the objects in random order;
  - questions with one-word answers, of five types:
        colour    "what colour is the <shape> ?"          (asked only when that shape is unique)
        shape     "what shape is the <colour> thing ?"   (asked only when that colour is unique)
        position  "where is the <colour> <shape> ?"      -> one of nine cell names, e.g. top-left
        count     "how many objects are there ?"         -> one | two | three
        exist     "is there a <colour> <shape> ?"        -> yes | no (half of them no)
Compositional hold-out: a few colour-shape pairs (HOLDOUT_PAIRS) never appear in the train/val/test
splits; the separate "holdout" split has at least one of them in every scene. A model that has learnt
"red" and "triangle" separately should still answer about a red triangle.

On disk (`load_dir`): DIR/images.npy (N, H, W, 3) uint8 and DIR/annotations.jsonl, one JSON object
per line and per image, in image order:
    {"caption": "a red circle ...", "qa": [{"q": "what colour is the circle ?", "a": "red", "type": "colour"}],
     "split": "train"}                          # "type" and "split" are optional
Text is lower-cased and split on white space; the vocabulary is built from the data.
"""

import functools
import json
import os

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # name: RGB
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "cyan": (40, 210, 220), "orange": (245, 140, 30), "white": (240, 240, 240),
}
SIZES = ("small", "large")
CELLS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
COUNT_WORDS = ("zero", "one", "two", "three")
HOLDOUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("green", "diamond"), ("yellow", "square"),
                 ("purple", "cross"))
SYNONYMS = {"square": ("square", "box"), "circle": ("circle", "disc"), "small": ("small", "little"),
            "large": ("large", "big")}
QUESTION_TYPES = ("colour", "shape", "position", "count", "exist")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class ShapesDataError(ValueError):
    """Malformed on-disk data; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _masks(px):
    """Boolean (px, px) stencils, one per shape."""
    r = (np.arange(px) + 0.5) / px * 2 - 1                       # cell coordinates in [-1, 1]
    y, x = np.meshgrid(r, r, indexing="ij")
    return {
        "circle": x ** 2 + y ** 2 <= 0.9,
        "square": (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8),
        "triangle": (y <= 0.85) & (y >= -0.85) & (np.abs(x) <= (y + 0.85) / 1.7 * 0.95),
        "diamond": np.abs(x) + np.abs(y) <= 0.95,
        "cross": ((np.abs(x) <= 0.3) | (np.abs(y) <= 0.3)) & (np.abs(x) <= 0.9) & (np.abs(y) <= 0.9),
    }


def render(objects, size, rng):
    """objects: list of (shape, colour, size, cell) -> (size, size, 3) uint8 image."""
    cell = size // 3
    # lightly textured background: a dark random tint, a soft gradient and pixel noise
    tint = rng.uniform(10, 45, size=3)
    grad = np.linspace(0, 1, size)[:, None] * rng.uniform(-12, 12) + np.linspace(0, 1, size)[None] * rng.uniform(-12, 12)
    img = tint[None, None] + grad[..., None] + rng.normal(0, 4, size=(size, size, 3))
    for shape, colour, sz, c in objects:
        px = cell - 1 if sz == "large" else max(3, (cell * 3) // 5)
        m = _masks(px)[shape]
        row, col = divmod(c, 3)
        slack = cell - px
        y0 = row * cell + rng.integers(0, slack + 1)
        x0 = col * cell + rng.integers(0, slack + 1)
        rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 8, size=3), 0, 255)
        img[y0:y0 + px, x0:x0 + px][m] = rgb
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Scenes, captions, questions
# ----------------------------------------------------------------------------------------------------

def _word(w, rng):
    alts = SYNONYMS.get(w)
    return alts[rng.integers(len(alts))] if alts else w


def caption(objects, rng):
    parts = []
    for i in rng.permutation(len(objects)):
        shape, colour, sz, c = objects[i]
        parts.append(f"a {_word(sz, rng)} {colour} {_word(shape, rng)} at the {CELLS[c]}")
    opener = ("there is", "the image shows", "we see", "a picture of")[rng.integers(4)]
    return f"{opener} " + " and ".join(parts)


def questions(objects, rng):
    """All askable questions for a scene, as dicts {q, a, type}."""
    shapes = [o[0] for o in objects]
    colours = [o[1] for o in objects]
    qa = []
    for shape, colour, sz, c in objects:
        if shapes.count(shape) == 1:
            qa.append(dict(q=f"what colour is the {_word(shape, rng)} ?", a=colour, type="colour"))
        if colours.count(colour) == 1:
            qa.append(dict(q=f"what shape is the {colour} thing ?", a=shape, type="shape"))
        qa.append(dict(q=f"where is the {colour} {_word(shape, rng)} ?", a=CELLS[c], type="position"))
    qa.append(dict(q="how many objects are there ?", a=COUNT_WORDS[len(objects)], type="count"))
    present = set(zip(colours, shapes))
    shape, colour = objects[rng.integers(len(objects))][:2]
    qa.append(dict(q=f"is there a {colour} {_word(shape, rng)} ?", a="yes", type="exist"))
    while True:  # a "no" question about an absent pair (any pair, so the hold-out pairs are asked about too)
        pair = (list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))])
        if pair not in present:
            qa.append(dict(q=f"is there a {pair[0]} {_word(pair[1], rng)} ?", a="no", type="exist"))
            break
    return qa


def _sample_objects(rng, holdout):
    """1-3 objects in distinct cells. holdout=False: no hold-out pair; True: at least one."""
    held = set(HOLDOUT_PAIRS)
    while True:
        n = rng.integers(1, 4)
        cells = rng.choice(9, size=n, replace=False)
        objs = [(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                 SIZES[rng.integers(2)], int(c)) for c in cells]
        has_held = any((o[1], o[0]) in held for o in objs)
        if has_held == holdout:
            return objs


def generate(n, split="train", seed=0, size=32):
    """n scenes of one split ('train', 'val', 'test' or 'holdout'), deterministic from (seed, split).
    Returns dict(images (n, size, size, 3) uint8, captions [str], qa [[{q, a, type}]], objects [[tuple]])."""
    if split not in ("train", "val", "test", "holdout"):
        raise ValueError(f"split: expected train, val, test or holdout, got {split!r}")
    if size < 12:
        raise ValueError(f"size: expected at least 12 pixels, got {size}")
    rng = np.random.default_rng([seed, ("train", "val", "test", "holdout").index(split)])
    images = np.empty((n, size, size, 3), np.uint8)
    caps, qas, objs = [], [], []
    for i in range(n):
        o = _sample_objects(rng, holdout=(split == "holdout"))
        images[i] = render(o, size, rng)
        caps.append(caption(o, rng))
        qas.append(questions(o, rng))
        objs.append(o)
    return dict(images=images, captions=caps, qa=qas, objects=objs)


# ----------------------------------------------------------------------------------------------------
# Vocabulary and the on-disk format
# ----------------------------------------------------------------------------------------------------

def build_vocab(texts):
    """Word-level vocabulary: the specials first, then every word in sorted order (deterministic)."""
    words = sorted({w for t in texts for w in t.split()})
    return {w: i for i, w in enumerate(list(SPECIALS) + [w for w in words if w not in SPECIALS])}


def all_texts(ds):
    return list(ds["captions"]) + [x for qa in ds["qa"] for d in qa for x in (d["q"], d["a"])]


def save_dir(ds, path, splits=None):
    """Write a dataset in the on-disk format (used by tests, and to hand-edit a small set)."""
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, "images.npy"), ds["images"])
    with open(os.path.join(path, "annotations.jsonl"), "w") as f:
        for i, (c, qa) in enumerate(zip(ds["captions"], ds["qa"])):
            rec = {"caption": c, "qa": qa}
            if splits is not None:
                rec["split"] = splits[i]
            f.write(json.dumps(rec) + "\n")


def load_dir(path):
    """Read DIR/images.npy + DIR/annotations.jsonl. Returns (dataset dict, list of split names or None).
    Raises ShapesDataError with a one-line message on anything malformed."""
    img_path, ann_path = os.path.join(path, "images.npy"), os.path.join(path, "annotations.jsonl")
    for p in (img_path, ann_path):
        if not os.path.isfile(p):
            raise ShapesDataError(f"--data-dir: missing file {p}")
    try:
        images = np.load(img_path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's data problem
        raise ShapesDataError(f"{img_path}: not a readable .npy array ({e.__class__.__name__})")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ShapesDataError(f"{img_path}: expected (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    caps, qas, splits = [], [], []
    with open(ann_path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                cap = str(rec["caption"]).lower().strip()
                qa = [dict(q=str(d["q"]).lower().strip(), a=str(d["a"]).lower().strip(),
                           type=str(d.get("type", "other"))) for d in rec.get("qa", [])]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ShapesDataError(f"{ann_path}:{ln}: bad annotation line ({e.__class__.__name__}: {e})")
            if any(len(d["a"].split()) != 1 for d in qa):
                raise ShapesDataError(f"{ann_path}:{ln}: answers must be one word")
            caps.append(cap)
            qas.append(qa)
            splits.append(rec.get("split"))
    if len(caps) != len(images):
        raise ShapesDataError(f"{ann_path}: {len(caps)} annotation lines for {len(images)} images in {img_path}")
    ds = dict(images=images, captions=caps, qa=qas, objects=None)
    return ds, (splits if any(s is not None for s in splits) else None)

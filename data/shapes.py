"""The shapes world, v2: procedural image-text data for the multimodal papers, built so that
answering needs *binding* (which colour goes with which shape, and where), deterministic from a
seed; plus the data-only baselines every model row is compared with, and a plain on-disk format for
real data.

Geometry (default 48x48 px): a 3x3 grid of 16 px cells, so an 8 px ViT patch grid (6x6) puts exactly
2x2 patches in each cell. A scene holds 2-4 objects in distinct cells; each has a shape, a colour
and a size: large = cell - 2 px (14 px), small = half a cell (8 px), placed with a little jitter
inside its cell. The five shapes differ by at least 24 of 64 pixels at the small size (68 at the
large one), so shape is visible at both sizes. (A first world of 32 px scenes with 6 px shapes,
cells that straddled patches and "exist" questions a colour-only reader answered, measured less
than it claimed: docs/multimodal_align.md, History.)

Caption: "large red square top and small blue x left ..." (size colour shape cell, objects in random
order; rng=None lists them in cell order, the one fixed template of the alignment set). Questions,
one per type per scene, one-word answers, each type's answers balanced by construction:
    colour    "what colour is the <shape> ?"      the colour OF a shape (asked when it is unique)
    shape     "what shape is at the <cell> ?"      the shape AT a cell
    position  "where is the <colour> <shape> ?"    the cell OF a coloured shape (a unique pair)
    count     "how many objects are there ?"       two | three | four
    exist     "is there a <colour> <shape> ?"      yes | no; 3/4 of the "no"s are swapped bindings
                                                   (both words in the scene, never on one object)
BINDING_TYPES are the four that a bag of words cannot answer. Compositional hold-out: HOLDOUT_PAIRS
never appear as objects in train/val/test; every "holdout" scene has at least one.

Baselines from the data alone (`baselines`): the blind prior (majority answer to the question
string, no scene) and the bag-of-words oracle (majority answer given the question and the caption's
words with their counts -- colours, shapes, sizes, cells -- estimated on 20,000 fresh scenes;
`bag_key` says how the tables stay dense): it knows everything a bag of words knows, not which word
goes with which. A model row means something only above both, per question type.

On disk (`load_dir`): DIR/images.npy (N, H, W, 3) uint8 and DIR/annotations.jsonl, one JSON object
per line and per image, in image order:
    {"caption": "a red circle ...",
     "qa": [{"q": "what colour is the circle ?", "a": "red", "type": "colour"}],
     "split": "train"}                          # "type" and "split" are optional
Text is lower-cased and split on white space; the vocabulary is built from the data.
"""

import functools
import json
import os
import re
import textwrap
from collections import Counter

import numpy as np

from data.run import pyplot, save_png

SHAPES = ("square", "triangle", "cross", "ring", "x")
COLOURS = {  # name: RGB
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "white": (240, 240, 240),
}
SIZES = ("small", "large")
CELLS = ("top-left", "top", "top-right", "left", "center", "right",
         "bottom-left", "bottom", "bottom-right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
N_OBJECTS = (2, 3, 4)
HOLDOUT_PAIRS = (("red", "triangle"), ("blue", "ring"), ("green", "x"), ("yellow", "square"),
                 ("purple", "cross"))
QUESTION_TYPES = ("colour", "shape", "position", "count", "exist")
BINDING_TYPES = ("colour", "shape", "position", "exist")
SPLITS = ("train", "val", "test", "holdout")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
SWAP_NO = 0.75    # share of "no" exist questions that are swapped bindings (when the scene has one)


class ShapesDataError(ValueError):
    """Malformed on-disk data; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _masks(px):
    """Boolean (px, px) stencils, one per shape."""
    r = (np.arange(px) + 0.5) / px * 2 - 1                       # pixel centres in [-1, 1]
    y, x = np.meshgrid(r, r, indexing="ij")
    rr = x ** 2 + y ** 2
    return {
        "square": (np.abs(x) <= 0.9) & (np.abs(y) <= 0.9),
        "triangle": np.abs(x) <= (y + 1) / 2,
        "cross": (np.abs(x) <= 0.3) | (np.abs(y) <= 0.3),
        "ring": (rr <= 1.1) & (rr >= 0.3),
        "x": np.abs(np.abs(x) - np.abs(y)) <= 0.35,
    }


def object_px(size, sz):
    cell = size // 3
    return cell - 2 if sz == "large" else max(4, cell // 2)


def render(objects, size, rng):
    """objects: list of (shape, colour, size, cell) -> (size, size, 3) uint8 image."""
    cell = size // 3
    # lightly textured background: a dark random tint, a soft gradient and pixel noise
    tint = rng.uniform(10, 45, size=3)
    ramp = np.linspace(0, 1, size)
    grad = ramp[:, None] * rng.uniform(-12, 12) + ramp[None] * rng.uniform(-12, 12)
    img = tint[None, None] + grad[..., None] + rng.normal(0, 4, size=(size, size, 3))
    for shape, colour, sz, c in objects:
        px = object_px(size, sz)
        row, col = divmod(c, 3)
        slack = cell - px                                           # jitter inside the cell only
        y0 = row * cell + rng.integers(0, slack + 1)
        x0 = col * cell + rng.integers(0, slack + 1)
        rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 8, size=3), 0, 255)
        img[y0:y0 + px, x0:x0 + px][_masks(px)[shape]] = rgb
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Scenes, captions, questions
# --------------------------------------------------------------------------------------------------

def caption(objects, rng=None):
    """Objects in random order (rng) or in cell order (rng=None: the fixed template)."""
    order = (rng.permutation(len(objects)) if rng is not None
             else np.argsort([o[3] for o in objects]))
    return " and ".join(f"{objects[i][2]} {objects[i][1]} {objects[i][0]} {CELLS[objects[i][3]]}"
                        for i in order)


def reference_captions(ds, n=5, seed=7):
    """Reference captions per scene, for captioning metrics (data/captions.py): its caption and, in
    the procedural world, n - 1 more with the objects in other random orders (each as correct);
    data without objects (--data-dir) has its one caption. -> [[caption, ...] per scene]."""
    if not ds.get("objects"):
        return [[c] for c in ds["captions"]]
    rng = np.random.default_rng(seed)
    return [[c] + [caption(o, rng) for _ in range(n - 1)]
            for c, o in zip(ds["captions"], ds["objects"])]


CAPTION_RE = re.compile(r"(\w+) (\w+) (\w+) ([\w-]+)(?: and |$)")


def parse_caption(text):
    """Caption -> sorted list of (shape, colour, size, cell index); the inverse of caption()."""
    return sorted((shape, colour, sz, CELLS.index(cell))
                  for sz, colour, shape, cell in CAPTION_RE.findall(text))


def questions(objects, rng, ask_held=False):
    """One question per type (colour and position only when the scene allows), as dicts
    {q, a, type}. ask_held=False: no question names a hold-out pair (else the answer to "is there
    a red triangle ?" would be a constant "no" outside the hold-out split, which a blind reader
    learns)."""
    shapes = [o[0] for o in objects]
    pairs = [(o[1], o[0]) for o in objects]
    qa = []
    unique_shape = [o for o in objects if shapes.count(o[0]) == 1]
    if unique_shape:
        shape, colour = unique_shape[rng.integers(len(unique_shape))][:2]
        qa.append(dict(q=f"what colour is the {shape} ?", a=colour, type="colour"))
    shape, _, _, c = objects[rng.integers(len(objects))]
    qa.append(dict(q=f"what shape is at the {CELLS[c]} ?", a=shape, type="shape"))
    unique_pair = [o for o in objects if pairs.count((o[1], o[0])) == 1]
    if unique_pair:
        shape, colour, _, c = unique_pair[rng.integers(len(unique_pair))]
        qa.append(dict(q=f"where is the {colour} {shape} ?", a=CELLS[c], type="position"))
    qa.append(dict(q="how many objects are there ?", a=COUNT_WORDS[len(objects)], type="count"))
    if rng.random() < 0.5:
        colour, shape = pairs[rng.integers(len(pairs))]
        qa.append(dict(q=f"is there a {colour} {shape} ?", a="yes", type="exist"))
    else:
        banned = set() if ask_held else set(HOLDOUT_PAIRS)
        swaps = sorted({(c, s) for c, _ in pairs for _, s in pairs} - set(pairs) - banned)
        if swaps and rng.random() < SWAP_NO:            # both words present, never on one object
            colour, shape = swaps[rng.integers(len(swaps))]
        else:                                           # any other absent pair
            absent = [(c, s) for c in COLOURS for s in SHAPES
                      if (c, s) not in pairs and (c, s) not in banned]
            colour, shape = absent[rng.integers(len(absent))]
        qa.append(dict(q=f"is there a {colour} {shape} ?", a="no", type="exist"))
    return qa


def sample_objects(rng, holdout):
    """2-4 objects in distinct cells. holdout=False: no hold-out pair; True: at least one."""
    held = set(HOLDOUT_PAIRS)
    n = N_OBJECTS[rng.integers(len(N_OBJECTS))]     # drawn once, so the count answers stay balanced
    while True:
        cells = rng.choice(9, size=n, replace=False)
        objs = [(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                 SIZES[rng.integers(2)], int(c)) for c in cells]
        if any((o[1], o[0]) in held for o in objs) == holdout:
            return objs


def generate(n, split="train", seed=0, size=48, images=True):
    """n scenes of one split ('train', 'val', 'test' or 'holdout'), deterministic from
    (seed, split). Returns dict(images (n, size, size, 3) uint8, captions [str],
    qa [[{q, a, type}]], objects [[tuple]]). images=False skips rendering (baselines need only the
    objects); captions and questions are the same."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if size < 12:
        raise ValueError(f"size: expected at least 12 pixels, got {size}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    # a stream of its own, so rendering (or images=False) does not shift the scenes
    img_rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    ims = np.empty((n if images else 0, size, size, 3), np.uint8)
    caps, qas, objs = [], [], []
    for i in range(n):
        o = sample_objects(rng, holdout=(split == "holdout"))
        if images:
            ims[i] = render(o, size, img_rng)
        caps.append(caption(o, rng))
        qas.append(questions(o, rng, ask_held=(split == "holdout")))
        objs.append(o)
    return dict(images=ims, captions=caps, qa=qas, objects=objs)


def binding_controlled(n_groups, per_group=8, seed=0, size=48):
    """The alignment set: groups of scenes that share one word multiset (3 objects, 3 distinct
    colours and shapes, the same sizes and the same 3 cells) but differ in which colour goes with
    which shape and which object sits where; captions in the fixed template (cell order).
    -> dataset dict plus 'group' ids."""
    rng = np.random.default_rng([seed, 99])
    ims, caps, objs, group = [], [], [], []
    for g in range(n_groups):
        colours = rng.choice(list(COLOURS), 3, replace=False)
        shapes = rng.choice(SHAPES, 3, replace=False)
        sizes = [SIZES[rng.integers(2)] for _ in range(3)]
        cells = sorted(int(c) for c in rng.choice(9, 3, replace=False))
        seen = set()
        while len(seen) < per_group:               # 6 bindings x 6 cell orders = 36 distinct scenes
            key = (tuple(rng.permutation(3)), tuple(rng.permutation(3)))
            if key in seen:
                continue
            seen.add(key)
            sp, cp = key
            o = [(str(shapes[sp[k]]), str(colours[k]), sizes[k], cells[cp[k]]) for k in range(3)]
            ims.append(render(o, size, rng))
            caps.append(caption(o))
            objs.append(o)
            group.append(g)
    return dict(images=np.stack(ims), captions=caps, qa=[[] for _ in caps], objects=objs,
                group=group)


# --------------------------------------------------------------------------------------------------
# Baselines from the data alone
# --------------------------------------------------------------------------------------------------

def word_bag(objects):
    """What a bag-of-words reader of the caption knows: each kind of caption word as a multiset
    (word -> count)."""
    return dict(colour=Counter(o[1] for o in objects), shape=Counter(o[0] for o in objects),
                size=Counter(o[2] for o in objects), cell=Counter(CELLS[o[3]] for o in objects))


# each hold-out colour's shape and each hold-out shape's colour
PARTNER = {**dict(HOLDOUT_PAIRS), **{s: c for c, s in HOLDOUT_PAIRS}}


def bag_key(d, bag):
    """-> (table keys, finest first; {answer word: its class} or None) for question d (dict q, type)
    and a caption's word bag (word_bag).

    The majority answer given the question and the whole bag (sizes and cells included) would need a
    table far larger than 20,000 scenes fill: most test keys would be unseen, and the oracle would
    fall back to the blind prior. So the key keeps what can bear on the answer, no name that cannot:
    - sizes are drawn independently of everything, cells independently of every attribute;
    - colour and shape names are interchangeable as long as each hold-out pair is renamed together
      (red and triangle never meet outside the hold-out split, so "red" and "triangle" rename as
      one). A bag is then described by each hold-out pair's (colour count, shape count), the counts
      of the unpaired colours, and which of these words the question names. The answer is kept as
      its class under the same renaming (its counts and flags); every word of one class is as likely
      to be right.
    position answers are cells: the key is the set of cells and the class the cell itself (any
    present cell is as likely as any other). Question types of other data (--data-dir) use the
    question and the whole bag. exist has ~1,700 keys, 1 in 8 test questions with fewer than
    MIN_VOTES reference votes: it backs off to the counts of its two words and of their hold-out
    partners, the numbers of objects, distinct colours and distinct shapes, and of hold-out pairs
    whose two words are both present (never a swapped "no"); then to the counts of its two words and
    the numbers of objects, distinct colours and distinct shapes."""
    t, words = d["type"], d["q"].split()
    if t not in QUESTION_TYPES:
        return [(t, d["q"], tuple(tuple(sorted(c.items())) for c in bag.values()))], None
    if t == "position":
        return [(t, tuple(sorted(bag["cell"])))], None
    if t == "count":
        return [(t, sum(bag["colour"].values()))], None
    named = {w for w in words if w in COLOURS or w in SHAPES}

    def cls(word):                          # the word's hold-out pair (or unpaired colour), renamed
        c, s = (word, PARTNER.get(word)) if word in COLOURS else (PARTNER[word], word)
        return bag["colour"][c], bag["shape"][s] if s else -1, c in named, s in named

    keys = [(t, tuple(sorted(cls(c) for c in COLOURS)))]
    if t == "exist":
        colour, shape = words[-3:-1]
        coarse = (t, bag["colour"][colour], bag["shape"][shape], sum(bag["colour"].values()),
                  len(bag["colour"]), len(bag["shape"]))
        # hold-out pairs with both words present: these can never be a swapped "no"
        both = sum(bag["colour"][c] > 0 and bag["shape"][s] > 0 for c, s in HOLDOUT_PAIRS)
        partners = bag["shape"][PARTNER.get(colour)], bag["colour"][PARTNER[shape]]
        keys += [coarse + partners + (both,), coarse]
    return keys, {w: cls(w) for w in bag[t]} if t in ("colour", "shape") else None


MIN_VOTES = 20    # reference answers a bag key needs for its majority to count (else: coarser)


def bag_answer(table, keys, classes, default):
    """The majority answer class of the first key with MIN_VOTES votes (else of the last key seen,
    else default) -> a word of that class (the first in sorted order)."""
    votes = [table[k] for k in keys if k in table]
    if not votes:
        return default
    best = _majority(next((v for v in votes if sum(v.values()) >= MIN_VOTES), votes[-1]))
    if classes is None:
        return best
    return min((w for w, c in classes.items() if c == best), default=default)


def _majority(counter):
    return max(sorted(counter), key=lambda a: counter[a])        # ties: alphabetical, deterministic


def fit_baselines(ref):
    """From a reference set: the majority answer per question string (blind prior), and the answer
    (class) votes per bag_key (bag-of-words oracle; empty without objects)."""
    blind, bag = {}, {}
    for objs, qa in zip(ref["objects"] or [None] * len(ref["qa"]), ref["qa"]):
        words = None if objs is None else word_bag(objs)
        for d in qa:
            blind.setdefault(d["q"], Counter())[d["a"]] += 1
            if words is not None:
                keys, classes = bag_key(d, words)
                for k in keys:
                    answer = d["a"] if classes is None else classes.get(d["a"])
                    bag.setdefault(k, Counter())[answer] += 1
    return {q: _majority(c) for q, c in blind.items()}, bag


def baseline_accuracy(tables, ds):
    """-> {'blind_prior': {type: acc, 'overall': acc}, 'bag_oracle': {...} or None (no objects)}.
    An unseen question (or bag key) falls back to the blind answer, then to the type's majority."""
    blind, bag = tables
    by_type = {}
    for qa in ds["qa"]:
        for d in qa:
            by_type.setdefault(d["type"], Counter())[d["a"]] += 1
    hits = {"blind_prior": {}, "bag_oracle": {}}
    objects = ds.get("objects")
    for i, qa in enumerate(ds["qa"]):
        words = None if objects is None else word_bag(objects[i])
        for d in qa:
            guess = blind.get(d["q"], _majority(by_type[d["type"]]))
            hits["blind_prior"].setdefault(d["type"], []).append(guess == d["a"])
            if words is not None:
                g2 = bag_answer(bag, *bag_key(d, words), guess)
                hits["bag_oracle"].setdefault(d["type"], []).append(g2 == d["a"])
    out = {}
    for name, h in hits.items():
        if not h:
            out[name] = None
            continue
        out[name] = {t: float(np.mean(v)) for t, v in h.items()}
        out[name]["overall"] = float(np.mean([x for v in h.values() for x in v]))
    return out


def binding_score(per_type):
    """Mean accuracy over the question types a bag of words cannot answer (colour, shape, position,
    exist); None when the data has none of them."""
    xs = [per_type[t] for t in BINDING_TYPES if t in per_type]
    return float(np.mean(xs)) if xs else None


def oracle_reference(oracle):
    """The bag-of-words oracle's scores (its {type: acc, 'overall': acc}) under every name a run
    gives them: question types, 'overall' = 'vqa', 'binding' = 'binding_score'; {} without an oracle
    (--data-dir)."""
    if oracle is None:
        return {}
    b = binding_score(oracle)
    return dict(oracle, vqa=oracle["overall"], binding=b, binding_score=b)


def at_or_below_oracle(scores, oracle):
    """scores: {name: accuracy} -> the names where a model scores at or below the bag-of-words
    oracle: there its score can come from the caption's words alone, without binding. [] without an
    oracle."""
    ref = oracle_reference(oracle)
    return [k for k, v in scores.items() if k in ref and v is not None and v <= ref[k]]


def baselines(test, seed=0, n_ref=20_000, ref=None):
    """The two data-only baselines on `test`, their tables fitted on n_ref fresh train-split scenes
    (no rendering; a seed the model's training data does not use), or on `ref` (e.g. a --data-dir
    train split). Result keys: 'blind_prior' and 'bag_oracle' (the bag-of-words oracle)."""
    if ref is None:
        ref = generate(n_ref, "train", seed=seed + 1000, images=False)
    return baseline_accuracy(fit_baselines(ref), test)


# --------------------------------------------------------------------------------------------------
# Vocabulary and the on-disk format
# --------------------------------------------------------------------------------------------------

def load_world(data_dir="", n_train=6000, n_eval=500, image_size=48, patch=8, min_train=64):
    """-> (dict split -> dataset dict, vocabulary): the procedural world v2 (train/val/test/holdout,
    seed 0), or DIR/images.npy + DIR/annotations.jsonl split by their 'split' field (80/10/10 by
    index without one). Raises ShapesDataError, naming the command-line flag, for data the
    multimodal files cannot use."""
    if data_dir:
        ds, splits = load_dir(data_dir)
        S = ds["images"].shape[1:3]
        if S[0] != S[1] or S[0] % patch:
            raise ShapesDataError(f"--data-dir images are {S[0]}x{S[1]}: need square images "
                                  f"whose side is a multiple of --patch {patch}")
        if not any(ds["qa"]):
            raise ShapesDataError("--data-dir: annotations.jsonl has captions but no questions "
                                  "('qa'); the models are measured on question answering, so "
                                  "there is nothing to train them on")
        n = len(ds["captions"])
        if splits is None:  # no split field: 80/10/10 by index
            splits = ["train" if i < 0.8 * n else "val" if i < 0.9 * n else "test"
                      for i in range(n)]
        bad = sorted({s for s in splits if s not in SPLITS})
        if bad:
            raise ShapesDataError(f"--data-dir: unknown split value {bad[0]!r} "
                                  f"(expected one of {', '.join(SPLITS)})")
        world = {s: dict(images=ds["images"][[i for i, x in enumerate(splits) if x == s]],
                         captions=[c for c, x in zip(ds["captions"], splits) if x == s],
                         qa=[q for q, x in zip(ds["qa"], splits) if x == s], objects=None)
                 for s in SPLITS}
        if len(world["train"]["captions"]) < min_train or not world["test"]["captions"]:
            raise ShapesDataError("--data-dir: need at least --batch-size train and 1 test example")
    else:
        world = {"train": generate(n_train, "train", seed=0, size=image_size),
                 "val": generate(n_eval, "val", seed=0, size=image_size),
                 "test": generate(n_eval, "test", seed=0, size=image_size),
                 "holdout": generate(n_eval, "holdout", seed=0, size=image_size)}
    vocab = build_vocab([t for s in world.values() for t in all_texts(s)]
                        + ["question: answer: caption: context:"])
    return world, vocab


def build_vocab(texts):
    """Word-level vocabulary: the specials first, then every word in sorted order (so the ids
    are deterministic)."""
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
    """Read DIR/images.npy + DIR/annotations.jsonl. Returns (dataset dict, list of split names or
    None). Raises ShapesDataError with a one-line message on anything malformed."""
    img_path, ann_path = os.path.join(path, "images.npy"), os.path.join(path, "annotations.jsonl")
    for p in (img_path, ann_path):
        if not os.path.isfile(p):
            raise ShapesDataError(f"--data-dir: missing file {p}")
    try:
        images = np.load(img_path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's data problem
        raise ShapesDataError(f"{img_path}: not a readable .npy array ({e.__class__.__name__})")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ShapesDataError(f"{img_path}: expected (N, H, W, 3) uint8, "
                              f"got {images.shape} {images.dtype}")
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
                raise ShapesDataError(f"{ann_path}:{ln}: bad annotation line "
                                      f"({e.__class__.__name__}: {e})")
            if any(len(d["a"].split()) != 1 for d in qa):
                raise ShapesDataError(f"{ann_path}:{ln}: answers must be one word")
            caps.append(cap)
            qas.append(qa)
            splits.append(rec.get("split"))
    if len(caps) != len(images):
        raise ShapesDataError(f"{ann_path}: {len(caps)} annotation lines for {len(images)} "
                              f"images in {img_path}")
    ds = dict(images=images, captions=caps, qa=qas, objects=None)
    return ds, (splits if any(s is not None for s in splits) else None)


def scene_grid(ds, path, n=8, cols=4, title=""):
    """A PNG of the first n scenes of a dataset dict, each with its caption and first question
    and answer (what the models see). -> path, or None without matplotlib (it is optional)."""
    plt = pyplot()
    n = min(n, len(ds["images"]))
    if plt is None or n == 0:
        return None
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 3.9 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(ds["images"][k], interpolation="nearest")
            qa = ds["qa"][k][:1]
            text = textwrap.wrap(ds["captions"][k], 44) + [f"Q: {d['q']} A: {d['a']}" for d in qa]
            ax.set_title("\n".join(text), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(plt, fig, path)

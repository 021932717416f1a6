"""World v1 of the shapes world, and the v1 pipeline pieces qformer_efficient.py still uses
(the CLIP-style ViT, its pretraining, the world loader). Kept unchanged so that qformer_efficient.py runs
and reproduces its README numbers until it moves to world v2 (data/shapes.py, data/vision.py); delete
then. Measured weaknesses of v1 (issue 11): the CLIP ViT mean-pools, so it does not bind; 6 px shapes
differ by a few pixels; 10 px cells do not line up with 4 px patches.

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
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.common import BadInput, Block, RMSNorm, batches, encode, pad, train_loop
from data.shapes import ShapesDataError, all_texts, build_vocab, load_dir

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
# The v1 pipeline (moved unchanged from multimodal_align.py)
# ----------------------------------------------------------------------------------------------------

def load_world(cfg):
    """-> dict split -> dataset dict, and the vocabulary."""
    if cfg.data_dir:
        try:
            ds, splits = load_dir(cfg.data_dir)
        except ShapesDataError as e:
            raise BadInput(str(e))
        if ds["images"].shape[1] != cfg.image_size or ds["images"].shape[2] != cfg.image_size:
            raise BadInput(f"--data-dir images are {ds['images'].shape[1:3]}, expected --image-size {cfg.image_size}")
        n = len(ds["captions"])
        if splits is None:  # no split field: 80/10/10 by index
            splits = ["train" if i < 0.8 * n else "val" if i < 0.9 * n else "test" for i in range(n)]
        world = {}
        for s in ("train", "val", "test", "holdout"):
            ids = [i for i, x in enumerate(splits) if x == s]
            world[s] = dict(images=ds["images"][ids], captions=[ds["captions"][i] for i in ids],
                            qa=[ds["qa"][i] for i in ids])
        if len(world["train"]["captions"]) < cfg.batch_size or len(world["val"]["captions"]) < 2:
            raise BadInput("--data-dir: need at least --batch-size train and 2 val examples")
    else:
        world = {"train": generate(cfg.n_train, "train", seed=0, size=cfg.image_size)}
        for s in ("val", "test", "holdout"):
            world[s] = generate(cfg.n_eval, s, seed=0, size=cfg.image_size)
    vocab = build_vocab([t for s in world.values() for t in all_texts(s)] + ["question: answer: caption: context:"])
    return world, vocab


class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, P = cfg.vit_dim, (cfg.image_size // cfg.patch) ** 2
        self.patch = cfg.patch
        self.embed = nn.Linear(3 * cfg.patch ** 2, C)
        self.pos = nn.Parameter(torch.randn(P, C) * 0.02)
        self.blocks = nn.ModuleList(Block(C, cfg.n_head, causal=False) for _ in range(cfg.vit_layers))
        self.norm = RMSNorm(C)

    def forward(self, img_BHW3):
        """-> list of per-block outputs, each (B, P, C); the last is normalised."""
        x = img_BHW3.float() / 127.5 - 1
        B, Hh, W, _ = x.shape
        p = self.patch
        x = x.view(B, Hh // p, p, W // p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, 3 * p * p)
        h = self.embed(x) + self.pos
        hs = []
        for blk in self.blocks:
            h = blk(h)
            hs.append(h)
        hs[-1] = self.norm(hs[-1])
        return hs


class TextEncoder(nn.Module):
    """CLIP's text side: 2 bidirectional blocks over caption words, mean-pooled."""

    def __init__(self, V, dim, n_head):
        super().__init__()
        self.emb = nn.Embedding(V, dim)
        self.pos = nn.Parameter(torch.randn(64, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, n_head, causal=False) for _ in range(2))

    def forward(self, ids_BT, pad_id):
        keep = (ids_BT != pad_id)
        h = self.emb(ids_BT) + self.pos[: ids_BT.shape[1]]
        m = keep[:, None, None, :]                                                # padding never attended
        for blk in self.blocks:
            h = blk(h, mask_LL=m)
        return (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)



def pretrain_clip(world, vocab, cfg, device):
    """CLIP: symmetric InfoNCE between pooled ViT features and a small caption encoder."""
    vit, txt = ViT(cfg).to(device), TextEncoder(len(vocab), cfg.vit_dim, cfg.n_head).to(device)
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    tr = world["train"]
    caps = pad([encode(vocab, c, bos=False) for c in tr["captions"]], vocab["<pad>"])
    imgs = torch.from_numpy(tr["images"])
    it = batches(len(caps), cfg.batch_size, seed=1)

    def loss_fn(step):
        b = next(it)
        zi = F.normalize(vit(imgs[b].to(device))[-1].mean(1), dim=-1)
        zt = F.normalize(txt(caps[b].to(device), vocab["<pad>"]), dim=-1)
        logits = scale.exp().clamp(max=100) * zi @ zt.T
        y = torch.arange(len(b), device=device)
        return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2

    train_loop(list(vit.parameters()) + list(txt.parameters()) + [scale], loss_fn, cfg.clip_steps, cfg, "clip", device)
    vit.eval()
    txt.eval()
    # retrieval: image -> caption top-1 within chunks of 100 val pairs (identical captions count as a hit)
    va = world["val"]
    vcaps = pad([encode(vocab, c, bos=False) for c in va["captions"]], vocab["<pad>"])
    hits = n = 0
    c = min(100, len(vcaps))
    with torch.no_grad():
        for i in range(0, len(vcaps) - c + 1, c):
            zi = F.normalize(vit(torch.from_numpy(va["images"][i:i + c]).to(device))[-1].mean(1), dim=-1)
            zt = F.normalize(txt(vcaps[i:i + c].to(device), vocab["<pad>"]), dim=-1)
            pred = (zi @ zt.T).argmax(1).cpu()
            hits += sum(va["captions"][i + int(p)] == va["captions"][i + j] for j, p in enumerate(pred))
            n += c
    return vit, hits / max(n, 1)



@torch.no_grad()
def vit_tokens(vit, images, cfg, device, layer=-2):
    """Frozen ViT features for the projector: the second-to-last block (as LLaVA), the 8x8 patch grid
    average-pooled to image_tokens (a square). -> (N, M, C) on the CPU."""
    g = cfg.image_size // cfg.patch
    m = int(round(math.sqrt(cfg.image_tokens)))
    out = []
    for i in range(0, len(images), 512):
        h = vit(torch.from_numpy(images[i:i + 512]).to(device))[layer]                   # (B, P, C)
        B, P, C = h.shape
        h = F.adaptive_avg_pool2d(h.transpose(1, 2).reshape(B, C, g, g), m).flatten(2).transpose(1, 2)
        out.append(h.float().cpu())
    return torch.cat(out)

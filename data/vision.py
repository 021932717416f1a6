"""The frozen vision encoder shared by the multimodal paper files: a small ViT pretrained once on
the shapes world (data/shapes.py) and cached on disk, the stand-in for a checkpoint a user would
download. Both paper files load it from here; neither imports the other.

Why this objective. A CLIP-style encoder (mean-pooled last layer) could not bind: a mean over
patches forgets which patch held what, so captions with swapped colours scored alike (measured on
the first shapes world: binding 0.53, cell 0.54). Here every 3x3 cell of the image has its own
token (the mean of its 2x2 patches) and three linear heads read, from that token alone, the colour,
shape and size of the object in the cell (or "empty"):
    L = sum over cells k of  CE(colour_k) + CE(shape_k) + CE(size_k)
So each cell token must carry its own object's attributes (binding) and the token's index is its
cell (position). The position encoding is a fixed 2-D sine-cosine table with the same RMS as the
normalised patch content, added at the input: it cannot be trained away and it works at any grid
size.

Image-text score (for the minimal-pair gate): the log-likelihood of the caption's cell contents,
    s(image, caption) = sum_k log p(colour_k, shape_k, size_k | cell token k)
A minimal pair is the true caption against the same caption with one attribute changed (colour,
shape, size, cell, or the colours of two objects swapped); accuracy is P(s(true) > s(changed)),
chance 0.5.

Shapes: B = batch, P = patches, C = width, K = cells (9).
"""

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.layers import LAYER_CODE, Block, RMSNorm, batches, train_loop
from data.multimodal import build_key, gate_or_stop, hash_str
from data.run import linear_probe
from data.shapes import COLOURS, SHAPES, SIZES, generate, parse_caption

GRID = 3                      # cells per side
GATE = 0.9                    # every minimal-pair kind must reach this (chance 0.5)
ATTRS = ("colour", "shape", "size")
# class 0 is "empty"
CLASSES = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}


@dataclass
class VisionConfig:
    image_size: int = 48
    patch: int = 8
    dim: int = 64
    layers: int = 4
    heads: int = 4
    n_train: int = 6000       # pretraining scenes (own seed: not the paper file's training scenes)
    n_heldout: int = 1000     # held-out scenes for the gates
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    dtype: str = "float32"


def config_for(cfg):
    """The encoder config a paper file's Config asks for; the same fields give the same cache file,
    so one pretrained encoder serves both multimodal files."""
    return VisionConfig(image_size=cfg.image_size, patch=cfg.patch, dim=cfg.vit_dim,
                        layers=cfg.vit_layers, heads=cfg.n_head, steps=cfg.vit_steps,
                        n_train=cfg.n_train, n_heldout=min(1000, max(cfg.n_eval, 50)),
                        dtype=cfg.dtype)


def sincos_2d(g, dim):
    """Fixed 2-D sine-cosine position table (g*g, dim), RMS 1: half the channels for rows, half for
    columns."""
    q = dim // 4
    freq = 1.0 / (100 ** (torch.arange(q).float() / q))
    r, c = torch.meshgrid(torch.arange(g).float(), torch.arange(g).float(), indexing="ij")
    ang_r, ang_c = r.flatten()[:, None] * freq, c.flatten()[:, None] * freq
    return torch.cat([ang_r.sin(), ang_r.cos(), ang_c.sin(), ang_c.cos()], 1) * math.sqrt(2)


class ViT(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.patch = vc.patch
        self.embed = nn.Linear(3 * vc.patch ** 2, vc.dim)
        self.embed_norm = RMSNorm(vc.dim)
        self.blocks = nn.ModuleList(Block(vc.dim, vc.heads, causal=False) for _ in range(vc.layers))
        self.norm = RMSNorm(vc.dim)

    def forward(self, img_BHW3):
        """-> list of hidden states (B, P, C): the input layer (patches + position), then every
        block's output; the last is normalised. Any image whose sides are multiples of the patch
        works."""
        x = img_BHW3.float() / 127.5 - 1
        B, H, W, _ = x.shape
        p = self.patch
        x = x.view(B, H // p, p, W // p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, 3 * p * p)
        pos = sincos_2d(H // p, self.embed.out_features).to(x.device)  # square images only
        h = self.embed_norm(self.embed(x)) + pos
        hs = [h]
        for blk in self.blocks:
            h = blk(h)
            hs.append(h)
        hs[-1] = self.norm(hs[-1])
        return hs


def pool_grid(h_BPC, side):
    """Average-pool the square patch grid to side x side tokens: (B, side*side, C)."""
    B, P, C = h_BPC.shape
    g = int(round(math.sqrt(P)))
    return F.adaptive_avg_pool2d(h_BPC.transpose(1, 2).reshape(B, C, g, g),
                                 side).flatten(2).transpose(1, 2)


class CellHeads(nn.Module):
    """Linear read-outs of colour, shape and size (class 0 = empty cell) from each cell token."""

    def __init__(self, dim):
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(dim, 1 + len(CLASSES[a])) for a in ATTRS})

    def forward(self, cells_BKC):
        # (B, K, classes)
        return {a: h(cells_BKC).float().log_softmax(-1) for a, h in self.heads.items()}


def cell_targets(objects_list):
    """Object lists -> {attr: (B, 9) long}, 0 where a cell is empty."""
    t = {a: torch.zeros(len(objects_list), GRID * GRID, dtype=torch.long) for a in ATTRS}
    for b, objs in enumerate(objects_list):
        for shape, colour, sz, c in objs:
            for a, v in zip(ATTRS, (colour, shape, sz)):
                t[a][b, c] = 1 + CLASSES[a].index(v)
    return t


@torch.no_grad()
def cell_logp(vit, heads, images, device, bs=256):
    """{attr: (N, 9, classes)} log-probabilities for every cell of every image (CPU)."""
    out = {a: [] for a in ATTRS}
    for i in range(0, len(images), bs):
        lp = heads(pool_grid(vit(torch.from_numpy(images[i:i + bs]).to(device))[-1], GRID))
        for a in ATTRS:
            out[a].append(lp[a].cpu())
    return {a: torch.cat(v) for a, v in out.items()}


def caption_score(logp, i, objects):
    """s(image i, caption) = sum over cells of log p(the caption's content of that cell)."""
    t = cell_targets([objects])
    return sum(logp[a][i].gather(-1, t[a][0][:, None]).sum().item() for a in ATTRS)


def minimal_pair(objects, kind, rng):
    """The same scene description with one attribute changed; None when the scene allows no such
    change."""
    objs = [list(o) for o in objects]
    j = int(rng.integers(len(objs)))
    if kind == "colour":
        objs[j][1] = str(rng.choice([c for c in COLOURS if c != objs[j][1]]))
    elif kind == "shape":
        objs[j][0] = str(rng.choice([s for s in SHAPES if s != objs[j][0]]))
    elif kind == "size":
        objs[j][2] = SIZES[1 - SIZES.index(objs[j][2])]
    elif kind == "cell":
        objs[j][3] = int(rng.choice([c for c in range(9) if c not in {o[3] for o in objs}]))
    else:  # binding: swap the colours of two objects that differ in colour and in shape
        pairs = [(a, b) for a in range(len(objs)) for b in range(a + 1, len(objs))
                 if objs[a][0] != objs[b][0] and objs[a][1] != objs[b][1]]
        if not pairs:
            return None
        a, b = pairs[rng.integers(len(pairs))]
        objs[a][1], objs[b][1] = objs[b][1], objs[a][1]
    return [tuple(o) for o in objs]


MINIMAL_PAIR_KINDS = ("colour", "shape", "size", "cell", "binding")


def minimal_pair_accuracy(score, objects_list, seed=0):
    """score(i, objects) -> float. Per kind: P(score(true caption) > score(changed caption)); ties
    count 1/2."""
    rng = np.random.default_rng(seed)
    acc = {}
    for kind in MINIMAL_PAIR_KINDS:
        hits = []
        for i, objs in enumerate(objects_list):
            alt = minimal_pair(objs, kind, rng)
            if alt is not None:
                s_true, s_alt = score(i, objs), score(i, alt)
                hits.append(1.0 if s_true > s_alt else 0.5 if s_true == s_alt else 0.0)
        acc[kind] = float(np.mean(hits)) if hits else float("nan")
    return acc


@torch.no_grad()
def tokens(vit, images, side, device, bs=256):
    """The LM-facing image tokens: the last layer, pooled to side x side (3 = one token per cell).
    (N, M, C)."""
    return torch.cat([pool_grid(vit(torch.from_numpy(images[i:i + bs]).to(device))[-1],
                                side).float().cpu()
                      for i in range(0, len(images), bs)])


def cell_probe(vit, train, test, device):
    """Per-cell linear probes on the cell tokens: colour/shape/size over occupied cells, and the
    cell index over all cells (does position survive to the last layer?)."""
    res = {}
    f_tr, f_te = (tokens(vit, train["images"], GRID, device),
                  tokens(vit, test["images"], GRID, device))
    t_tr, t_te = cell_targets(train["objects"]), cell_targets(test["objects"])
    x_tr, x_te = f_tr.flatten(0, 1), f_te.flatten(0, 1)
    for a in ATTRS:
        y_tr, y_te = t_tr[a].flatten(), t_te[a].flatten()
        keep = y_te > 0
        res[a] = linear_probe(x_tr[y_tr > 0], y_tr[y_tr > 0], x_te[keep], y_te[keep])
    k = torch.arange(GRID * GRID)
    res["cell"] = linear_probe(x_tr, k.repeat(len(f_tr)), x_te, k.repeat(len(f_te)))
    return res


def pretrain(vc, device, seed=0, metrics=None):
    """Train the ViT and its cell heads; -> (vit, heads, report with the gates). metrics: a
    metrics.jsonl path."""
    torch.manual_seed(seed)
    tr = generate(vc.n_train, "train", seed=seed + 7, size=vc.image_size)
    vit, heads = ViT(vc).to(device), CellHeads(vc.dim).to(device)
    imgs, tgt = torch.from_numpy(tr["images"]), cell_targets(tr["objects"])
    it = batches(len(imgs), vc.batch_size, seed=seed + 11)

    def loss_fn(step):
        b = next(it)
        lp = heads(pool_grid(vit(imgs[b].to(device))[-1], GRID))
        return sum(F.nll_loss(lp[a].flatten(0, 1), tgt[a][b].flatten().to(device)) for a in ATTRS)

    train_loop(list(vit.parameters()) + list(heads.parameters()), loss_fn, vc.steps, vc, "vision",
               device, metrics=metrics)
    vit.eval()
    heads.eval()
    return vit, heads, gates(vit, heads, vc, device, seed, probe_train=tr)


def gates(vit, heads, vc, device, seed=0, probe_train=None):
    """Minimal-pair accuracy per kind (on held-out scenes, captions parsed back from the text) and
    the per-cell linear probe. Computed and reported, never asserted."""
    held = generate(vc.n_heldout, "val", seed=seed + 7, size=vc.image_size)
    logp = cell_logp(vit, heads, held["images"], device)
    objs = [parse_caption(c) for c in held["captions"]]  # the caption text is what is scored
    mp = minimal_pair_accuracy(lambda i, o: caption_score(logp, i, o), objs, seed=seed)
    sub = {k: v[:2000] for k, v in (probe_train or held).items()}
    return dict(minimal_pairs=mp, cell_probe=cell_probe(vit, sub, held, device))


# what builds the encoder and its stored gate report: part of its cache key
VISION_CODE = (VisionConfig, sincos_2d, ViT, pool_grid, CellHeads, cell_targets, cell_logp,
               caption_score, minimal_pair, minimal_pair_accuracy, cell_probe, pretrain, gates)


def load_or_pretrain(vc, cache_dir, device, seed=0, log=print, metrics=None):
    """The shared encoder: loaded from cache_dir when a checkpoint for this exact config exists,
    else pretrained and saved there. -> (vit, heads, report); report['trained'] says which
    happened."""
    tag = ("_".join(f"{k}={v}" for k, v in asdict(vc).items()) + f"_seed={seed}_"
           + build_key(*VISION_CODE, *LAYER_CODE))
    path = os.path.join(cache_dir, f"vision_{hash_str(tag):016x}.pt")
    vit, heads = ViT(vc).to(device), CellHeads(vc.dim).to(device)
    if os.path.exists(path):
        ck = torch.load(path, map_location=device, weights_only=True)
        vit.load_state_dict(ck["vit"])
        heads.load_state_dict(ck["heads"])
        log(f"vision encoder: loaded {path}")
        return vit.eval(), heads.eval(), dict(ck["report"], trained=False, path=path)
    vit, heads, report = pretrain(vc, device, seed, metrics=metrics)
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(dict(vit=vit.state_dict(), heads=heads.state_dict(), report=report,
                    config=asdict(vc)), path + ".tmp")
    os.replace(path + ".tmp", path)
    return vit, heads, dict(report, trained=True, path=path)


def gate_line(report):
    mp, pr = report["minimal_pairs"], report["cell_probe"]
    return (f"minimal pairs (chance 0.5, gate >= {GATE}): "
            + ", ".join(f"{k} {v:.3f}" for k, v in mp.items()) + " | per-cell linear probe: "
            + ", ".join(f"{k} {v:.3f}" for k, v in pr.items()))


def frozen_tokens(cfg, world, device, metrics=None, seed=0):
    """The encoder as both paper files use it: loaded from --cache-dir (or pretrained and saved
    there), its gate printed with PASS / FAIL (a FAIL stops the run: data/multimodal.gate_or_stop),
    and its tokens for every split with scenes, the patch grid pooled to cfg.image_tokens (a
    square). seed: the encoder's own seed (its initialisation, pretraining scenes and batches;
    data/multimodal.backbone_seed).
    -> (vit, {split: (N, P, C)}, the gates for results.json)."""
    vit, _, rep = load_or_pretrain(config_for(cfg), cfg.cache_dir, device, seed=seed,
                                   metrics=metrics)
    passed = min(rep["minimal_pairs"].values()) >= GATE
    gate_or_stop(cfg, passed, f"vision encoder: {gate_line(rep)} -> {'PASS' if passed else 'FAIL'}")
    side = int(round(math.sqrt(cfg.image_tokens)))
    feats = {s: tokens(vit, ds["images"], side, device)
             for s, ds in world.items() if ds["captions"]}
    return vit, feats, dict(vision_minimal_pairs=rep["minimal_pairs"],
                            vision_cell_probe=rep["cell_probe"])


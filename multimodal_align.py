"""DeepInsert (Platonic grounding): image tokens enter the language model at a deeper layer.

Paper: Choraria et al., "DeepInsert: Early Layer Bypass for Efficient and Performant Multimodal
Understanding" (v1 "Platonic Grounding for Efficient Multimodal Language Models"), arXiv 2504.19327,
EACL 2026; restated in ../shared/papers/multimodal_align.md. Alignment metric: Huh et al. 2024,
"The Platonic Representation Hypothesis" (mutual k-NN); linear CKA: Kornblith et al. 2019.

The whole argument in one file:
  1. two small models pretrained separately here, then frozen: a ViT (CLIP-style, against a small text
     encoder) and a decoder-only LM (RoPE) trained on text alone;
  2. how well their layers already line up (mutual k-NN and CKA, against a shuffled-pairs null and a
     random-init LM);
  3. a LLaVA-style bridge (2-layer MLP projector; stage 1 projector-only captioning, stage 2 projector + LM
     on question answering) in which the projected image tokens enter at layer l instead of 0:
         text tokens alone run through layers 0..l-1; the image tokens are spliced into the hidden states
         at layer l at their original positions (RoPE positions kept); the merged sequence runs l..N-1.
     A real skip, not a mask, and the KV cache of layers < l holds text only.
  4. what it buys: prefill FLOPs by the paper's formula and counted, wall clock, and QA accuracy per l.

    python multimodal_align.py                           # l in {0, N/4, N/2}, one seed (~10-15 min CPU)
    python multimodal_align.py --seeds 1,2,3             # the same over three seeds
    python multimodal_align.py --insert-layer 2          # one l

Shape legend:
    B = batch   M = image tokens   T = text tokens   L = sequence length (M + T)
    D = LM width   V = vocabulary   P = ViT patches   C = ViT width   N = LM layers   l = insert layer
Sequence layout (LLaVA): [<bos>] [image x M] [question: ... answer:] [answer] [<eos>]; image positions 1..M.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data.shapes import QUESTION_TYPES, ShapesDataError, all_texts, build_vocab, generate, load_dir


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------

@dataclass
class Config:
    # data
    n_train: int = 8000
    n_eval: int = 1024          # val/test/hold-out scenes each (alignment uses n = 1024 pairs)
    image_size: int = 32
    data_dir: str = ""
    # ViT (CLIP-style)
    patch: int = 4
    vit_dim: int = 64
    vit_layers: int = 4
    image_tokens: int = 16      # the ViT's 8x8 patch grid average-pooled to this many tokens (a square)
    # LM
    d_model: int = 128
    n_layer: int = 8
    n_head: int = 4
    max_len: int = 64
    # training
    clip_steps: int = 400
    lm_steps: int = 800
    stage1_steps: int = 100
    stage2_steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    # the experiment
    insert_layer: int = -1      # -1: the sweep {0, N/4, N/2}
    seeds: str = "0"
    knn_k: int = 10
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    cost_only: bool = False
    out: str = os.path.join("out", "multimodal_align")


HELP = dict(
    n_train="training scenes (procedural world)", n_eval="scenes in each of val/test/hold-out",
    image_size="image side in pixels", data_dir="real data: DIR/images.npy + DIR/annotations.jsonl (see data/shapes.py)",
    patch="ViT patch size", vit_dim="ViT width C", vit_layers="ViT blocks",
    image_tokens="image tokens M given to the LM (a square number; the patch grid is average-pooled)",
    d_model="LM width D", n_layer="LM blocks N", n_head="attention heads (LM and ViT)", max_len="longest LM text",
    clip_steps="CLIP pretraining steps (ViT + text encoder)", lm_steps="text-only LM pretraining steps",
    stage1_steps="stage 1 steps: projector only, captioning", stage2_steps="stage 2 steps: projector + LM, QA and captions",
    batch_size="batch size for every stage", lr="AdamW learning rate (every stage)",
    insert_layer="layer l where image tokens enter (0 = plain LLaVA); -1 sweeps {0, N/4, N/2}",
    seeds="comma-separated seeds for the bridge runs (the frozen backbones use seed 0)",
    knn_k="k of the mutual k-NN alignment score", device="auto | cpu | cuda | mps",
    dtype="float32 | bfloat16 (autocast, opt-in)", compile="torch.compile the LM blocks (opt-in)",
    cost_only="measure prefill FLOPs (formula and counted) and wall time per l, then stop (no bridge training)",
    out="output folder: results.json, cached backbones, checkpoints",
)


class BadInput(ValueError):
    """A user error: one line on stderr, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# Data: the shapes world (data/shapes.py), tokenised once
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


def encode(vocab, text, bos=True, eos=False):
    ids = [vocab.get(w, vocab["<unk>"]) for w in text.split()]
    return ([vocab["<bos>"]] if bos else []) + ids + ([vocab["<eos>"]] if eos else [])


def pad(seqs, value):
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


def qa_prompt(q):
    return f"question: {q} answer:"


# ----------------------------------------------------------------------------------------------------
# Model pieces
# ----------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x_BhLd, pos_L):
    """Rotary embedding at explicit positions pos_L: image tokens keep positions 1..M even when they
    enter late, and text keeps M+1.. even while it runs alone."""
    hd = x_BhLd.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, device=x_BhLd.device).float() / hd))
    ang = pos_L.float()[:, None] * inv[None]                                   # (L, hd/2)
    x1, x2 = x_BhLd.float().chunk(2, -1)
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).to(x_BhLd.dtype)


class Block(nn.Module):
    """Pre-norm transformer block; causal with RoPE (LM) or bidirectional without (ViT, text encoder).
    FFN width 4D. Per layer and sequence length L: QKV 6LD^2, attention 4L^2D + out-proj 2LD^2, FFN 16LD^2."""

    def __init__(self, dim, n_head, causal):
        super().__init__()
        self.nh, self.causal = n_head, causal
        self.ln1, self.ln2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def attn_qkv(self, x_BLD, pos_L):
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(self.ln1(x_BLD)).view(B, L, 3, self.nh, D // self.nh).permute(2, 0, 3, 1, 4)
        if self.causal:
            q, k = rope(q, pos_L), rope(k, pos_L)
        return q, k, v                                                          # (B, h, L, hd) each

    def finish(self, x_BLD, y_BhLd):
        B, L, D = x_BLD.shape
        x = x_BLD + self.proj(y_BhLd.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def forward(self, x_BLD, pos_L=None, mask_LL=None, cache=None):
        """cache: None, or a dict that receives this call's (k, v) and, if it holds some, is attended to
        first (decoding). mask_LL: boolean 'may attend' (overrides causal; used by the masked reference)."""
        q, k, v = self.attn_qkv(x_BLD, pos_L)
        if cache is not None and "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        if mask_LL is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL)
        else:  # decoding one token with a cache: it may see everything cached
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and q.shape[2] == k.shape[2])
        return self.finish(x_BLD, y)


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


class LM(nn.Module):
    """Decoder-only LM whose blocks can be entered with extra (image) tokens at layer l."""

    def __init__(self, V, cfg):
        super().__init__()
        self.emb = nn.Embedding(V, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, causal=True) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, V, bias=False)

    def text_forward(self, ids_BT):
        """Plain text LM: -> logits (B, T, V) and per-layer hidden states."""
        h = self.emb(ids_BT)
        pos = torch.arange(ids_BT.shape[1], device=ids_BT.device)
        hs = []
        for blk in self.blocks:
            h = blk(h, pos)
            hs.append(h)
        return self.head(self.norm(h)), hs


def splice(h_BTD, img_BMD):
    """Insert the image tokens after <bos>: (B, 1+M+T-1, D). Positions are the original ones."""
    return torch.cat([h_BTD[:, :1], img_BMD.to(h_BTD.dtype), h_BTD[:, 1:]], 1)


def deep_insert_blocks(blocks, h_BTD, img_BMD, insert_layer, caches=None):
    """The DeepInsert forward through the block stack (prefill).
    Layers < l: text alone at positions [0, M+1, M+2, ...]; at layer l the image tokens are spliced in at
    positions 1..M; layers >= l see the merged sequence. caches: optional list of per-layer dicts."""
    M, T = img_BMD.shape[1], h_BTD.shape[1]
    dev = h_BTD.device
    pos_text = torch.cat([torch.zeros(1, device=dev, dtype=torch.long), torch.arange(M + 1, M + T, device=dev)])
    pos_all = torch.arange(M + T, device=dev)
    h, pos = h_BTD, pos_text
    for i, blk in enumerate(blocks):
        if i == insert_layer:
            h, pos = splice(h, img_BMD), pos_all
        h = blk(h, pos, cache=None if caches is None else caches[i])
    return h


class Bridge(nn.Module):
    """LLaVA-style model: frozen ViT features -> 2-layer MLP projector -> LM (entered at layer l)."""

    def __init__(self, lm, cfg):
        super().__init__()
        self.lm = lm
        self.proj = nn.Sequential(nn.Linear(cfg.vit_dim, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))

    def forward(self, feats_BMC, ids_BT, insert_layer):
        """ids_BT starts with <bos>; returns logits for the text positions only: (B, T, V)."""
        img = self.proj(feats_BMC)
        h = deep_insert_blocks(self.lm.blocks, self.lm.emb(ids_BT), img, insert_layer)
        M = img.shape[1]
        h_text = torch.cat([h[:, :1], h[:, 1 + M:]], 1)                      # drop the image positions
        return self.lm.head(self.lm.norm(h_text))

    def masked_reference(self, feats_BMC, ids_BT, insert_layer):
        """Slow oracle: the full [bos, image, text] sequence through every layer; below l the text may not
        attend to image positions (and image positions attend only to themselves), at layer l the image
        positions are overwritten with the projected tokens. Must equal forward() on text positions."""
        img = self.proj(feats_BMC)
        e = self.lm.emb(ids_BT)
        M, T = img.shape[1], ids_BT.shape[1]
        h = splice(e, torch.zeros_like(img))
        L = M + T
        is_img = torch.zeros(L, dtype=torch.bool)
        is_img[1:1 + M] = True
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        early = causal & (is_img[:, None] == is_img[None, :])   # text<->text, image<->image only
        pos = torch.arange(L)
        for i, blk in enumerate(self.lm.blocks):
            if i == insert_layer:
                h = torch.cat([h[:, :1], img, h[:, 1 + M:]], 1)
            h = blk(h, pos, mask_LL=early if i < insert_layer else causal)
        h_text = torch.cat([h[:, :1], h[:, 1 + M:]], 1)
        return self.lm.head(self.lm.norm(h_text))

    @torch.no_grad()
    def generate(self, feats_BMC, ids_BT, insert_layer, max_new, use_cache=True):
        """Greedy decoding. With the cache, layers < l hold the text's keys/values only."""
        if not use_cache:
            out = ids_BT
            for _ in range(max_new):
                nxt = self.forward(feats_BMC, out, insert_layer)[:, -1].argmax(-1, keepdim=True)
                out = torch.cat([out, nxt], 1)
            return out[:, ids_BT.shape[1]:]
        img = self.proj(feats_BMC)
        M, N = img.shape[1], len(self.lm.blocks)
        caches = [dict() for _ in range(N)]
        h = deep_insert_blocks(self.lm.blocks, self.lm.emb(ids_BT), img, insert_layer, caches)
        nxt = self.lm.head(self.lm.norm(h[:, -1:])).argmax(-1)
        new = [nxt]
        for step in range(1, max_new):
            pos = torch.tensor([M + ids_BT.shape[1] + step - 1])                  # original position
            h = self.lm.emb(nxt)
            for blk, c in zip(self.lm.blocks, caches):
                h = blk(h, pos, cache=c)
            nxt = self.lm.head(self.lm.norm(h)).argmax(-1)
            new.append(nxt)
        return torch.cat(new, 1)


# ----------------------------------------------------------------------------------------------------
# FLOPs: the paper's formula and the counter
# ----------------------------------------------------------------------------------------------------

def layer_flops(L, D, d_ff):
    """Per layer, sequence length L: QKV 6LD^2 + attention 4L^2D + out-proj 2LD^2 + FFN 4LD*d_ff."""
    return 6 * L * D ** 2 + 4 * L ** 2 * D + 2 * L * D ** 2 + 4 * L * D * d_ff


def prefill_flops(T, M, N, l, D, d_ff):
    """FLOPs(l) = l*F(T) + (N-l)*F(T+M)   (per sequence; blocks only, no embedding or head)."""
    return l * layer_flops(T, D, d_ff) + (N - l) * layer_flops(T + M, D, d_ff)


def counted_prefill_flops(lm, img_BMD, ids_BT, l):
    """torch.utils.flop_counter over the block stack, with the math SDPA kernel so attention is counted
    (CPU's default kernel reports 0; the math kernel counts it as non-causal, like the formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        deep_insert_blocks(lm.blocks, lm.emb(ids_BT), img_BMD, l)
    return fc.get_total_flops()


# ----------------------------------------------------------------------------------------------------
# Alignment metrics (PRH protocol)
# ----------------------------------------------------------------------------------------------------

def prh_normalise(x_ND):
    """Clamp at the 0.95 quantile of |x|, then L2-normalise rows."""
    q = torch.quantile(x_ND.abs().flatten().float(), 0.95)
    return F.normalize(x_ND.float().clamp(-q, q), dim=-1)


def mutual_knn(a_ND, b_ND, k):
    """mean_i |kNN_A(i) & kNN_B(i)| / k with cosine neighbours, self excluded. Chance ~ k/(n-1)."""
    def knn(x):
        s = x @ x.T
        s.fill_diagonal_(-float("inf"))
        return s.topk(k, dim=1).indices
    na, nb = knn(prh_normalise(a_ND)), knn(prh_normalise(b_ND))
    hits = (na[:, :, None] == nb[:, None, :]).any(-1).float().sum(1)
    return (hits / k).mean().item()


def linear_cka(a_ND, b_ND):
    """||B^T A||_F^2 / (||A^T A||_F ||B^T B||_F) on centred features."""
    a = a_ND.double() - a_ND.double().mean(0)
    b = b_ND.double() - b_ND.double().mean(0)
    return ((b.T @ a).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm())).item()


def heatmap(mat, rows, cols, title):
    """A terminal heat map: one shade character per cell, values printed to the right."""
    shades = " .:-=+*#%@"
    lo, hi = float(np.min(mat)), float(np.max(mat))
    lines = [title, "      " + "".join(f"{c:>3s}" for c in cols)]
    for r, row in zip(rows, mat):
        cells = "".join(f"  {shades[min(9, int((v - lo) / (hi - lo + 1e-12) * 9.999))]}" for v in row)
        lines.append(f"{r:>5s} {cells}   " + " ".join(f"{v:.3f}" for v in row))
    lines.append(f"      (shade: {lo:.3f} -> {hi:.3f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Training loops
# ----------------------------------------------------------------------------------------------------

def autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def train_loop(params, loss_fn, steps, cfg, desc, device):
    """AdamW with linear warm-up (5%) and cosine decay; loss_fn(step) -> scalar loss."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    bar = tqdm(range(steps), desc=desc, leave=False, disable=steps < 20, dynamic_ncols=True)
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast(cfg, device):
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


def batches(n, bs, seed):
    """Deterministic stream of index batches over n items."""
    g = np.random.default_rng(seed)
    while True:
        perm = g.permutation(n)
        for i in range(0, n - bs + 1, bs):
            yield perm[i:i + bs]


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


def lm_texts(ds):
    """Text-only LM corpus: captions, and 'context: <caption> question: <q> answer: <a>'."""
    out = []
    for c, qa in zip(ds["captions"], ds["qa"]):
        out.append(f"caption: {c}")
        out += [f"context: {c} {qa_prompt(d['q'])} {d['a']}" for d in qa]
    return out


def pretrain_lm(world, vocab, cfg, device):
    lm = LM(len(vocab), cfg).to(device)
    texts = lm_texts(world["train"])
    ids = pad([encode(vocab, t, eos=True)[: cfg.max_len] for t in texts], vocab["<pad>"])
    it = batches(len(ids), cfg.batch_size, seed=2)

    def loss_fn(step):
        x = ids[next(it)].to(device)
        logits, _ = lm.text_forward(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                               ignore_index=vocab["<pad>"])

    train_loop(list(lm.parameters()), loss_fn, cfg.lm_steps, cfg, "lm", device)
    lm.eval()
    # text-only QA: context + question -> answer, greedy one word (val)
    va = world["val"]
    prompts = [(f"context: {c} {qa_prompt(d['q'])}", d["a"]) for c, qa in zip(va["captions"], va["qa"]) for d in qa[:2]]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(prompts), 256):
            chunk = prompts[i:i + 256]
            seqs = [encode(vocab, p) for p, _ in chunk]
            x = pad(seqs, vocab["<pad>"]).to(device)
            logits, _ = lm.text_forward(x)
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            pred = logits[torch.arange(len(seqs)), last].argmax(-1).cpu()
            correct += sum(int(p) == vocab.get(a, -1) for p, (_, a) in zip(pred, chunk))
    return lm, correct / len(prompts)


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


def qa_items(ds, vocab):
    """(scene index, prompt ids, answer id, type) for every question."""
    return [(i, encode(vocab, qa_prompt(d["q"])), vocab.get(d["a"], vocab["<unk>"]), d["type"])
            for i, qa in enumerate(ds["qa"]) for d in qa]


def qa_batch(items, vocab):
    """Teacher forcing for QA: input [bos question: q answer: a], target at input position i = token i+1,
    kept only for the answer and <eos> (the loss is on the answer)."""
    pad_id = vocab["<pad>"]
    x = pad([p + [a, vocab["<eos>"]] for _, p, a, _ in items], pad_id)
    tgt = torch.full_like(x, pad_id)
    for j, (_, p, a, _) in enumerate(items):
        tgt[j, len(p) - 1], tgt[j, len(p)] = a, vocab["<eos>"]   # "answer:" -> a, a -> <eos>
    return x[:, :-1], tgt[:, :-1]


def train_bridge(lm0, feats, world, vocab, cfg, l, seed, device):
    """Stage 1 (projector only, captioning) then stage 2 (projector + LM, QA and captions), inserting at l."""
    torch.manual_seed(seed)
    model = Bridge(copy.deepcopy(lm0), cfg).to(device)
    if cfg.compile:   # in place: parameter names (and checkpoints) keep no _orig_mod. prefix
        for blk in model.lm.blocks:
            blk.compile()
    tr = world["train"]
    caps = [encode(vocab, "caption: " + c, eos=True)[: cfg.max_len] for c in tr["captions"]]
    qas = qa_items(tr, vocab)
    pad_id = vocab["<pad>"]

    def caption_loss(b):
        x = pad([caps[i] for i in b], pad_id).to(device)
        logits = model(feats["train"][b].to(device), x[:, :-1], l)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), ignore_index=pad_id)

    def qa_loss(items):
        inp, tgt = qa_batch(items, vocab)
        logits = model(feats["train"][[i for i, *_ in items]].to(device), inp.to(device), l)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.to(device).reshape(-1),
                               ignore_index=pad_id)

    it_cap = batches(len(caps), cfg.batch_size, seed=seed * 10 + 3)
    it_cap2 = batches(len(caps), max(1, cfg.batch_size // 4), seed=seed * 10 + 5)   # stage 2's caption side
    it_qa = batches(len(qas), cfg.batch_size, seed=seed * 10 + 4)
    for p in model.lm.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    train_loop(list(model.proj.parameters()), lambda s: caption_loss(next(it_cap)), cfg.stage1_steps, cfg,
               f"l={l} stage1", device)
    for p in model.lm.parameters():
        p.requires_grad_(True)
    step_times = []

    def stage2_loss(step):
        t = time.perf_counter()
        # QA, plus a quarter-size caption batch so the bridge keeps describing whole scenes
        loss = qa_loss([qas[i] for i in next(it_qa)]) + 0.5 * caption_loss(next(it_cap2))
        step_times.append(t)
        return loss

    train_loop(list(model.parameters()), stage2_loss, cfg.stage2_steps, cfg, f"l={l} stage2", device)
    gaps = np.diff(step_times)
    model.eval()
    return model, dict(train_s=time.perf_counter() - t0, stage2_step_ms=float(np.median(gaps) * 1e3) if len(gaps) else None)


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def qa_accuracy(model, feats, ds, vocab, l, device, bs=256):
    """Exact match of the one-word answer (argmax at the last prompt position), overall and per type."""
    items = qa_items(ds, vocab)
    hit = {t: [] for t in QUESTION_TYPES}
    for i in range(0, len(items), bs):
        chunk = items[i:i + bs]
        x = pad([p for _, p, _, _ in chunk], vocab["<pad>"]).to(device)
        logits = model(feats[[j for j, *_ in chunk]].to(device), x, l)
        last = torch.tensor([len(p) - 1 for _, p, _, _ in chunk], device=device)
        pred = logits[torch.arange(len(chunk), device=device), last].argmax(-1).cpu().tolist()
        for (_, _, a, t), p in zip(chunk, pred):
            hit.setdefault(t, []).append(p == a)
    per_type = {t: float(np.mean(v)) for t, v in hit.items() if v}
    return float(np.mean([x for v in hit.values() for x in v])), per_type


@torch.no_grad()
def caption_token_acc(model, feats, ds, vocab, l, device, bs=256):
    """Caption score: teacher-forced next-word accuracy on the caption words (after 'caption:')."""
    caps = [encode(vocab, "caption: " + c, eos=True) for c in ds["captions"]]
    right = total = 0
    for i in range(0, len(caps), bs):
        x = pad(caps[i:i + bs], vocab["<pad>"]).to(device)
        logits = model(feats[i:i + bs].to(device), x[:, :-1], l)
        tgt = x[:, 1:]
        ok = (tgt != vocab["<pad>"])
        ok[:, 0] = False                                   # the word 'caption:' itself is given
        right += ((logits.argmax(-1) == tgt) & ok).sum().item()
        total += ok.sum().item()
    return right / total


@torch.no_grad()
def prefill_ms(lm, img_BMD, ids_BT, layers, rounds=15):
    """Wall time (ms) of the block-stack prefill at each l: the best of `rounds` interleaved rounds, so
    that a busy spell of the machine hits every l alike and the minimum shows the undisturbed time."""
    def once(l):
        t = time.perf_counter()
        deep_insert_blocks(lm.blocks, lm.emb(ids_BT), img_BMD, l)
        if img_BMD.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t
    for l in layers:                                                     # warm-up
        once(l)
    ts = {l: [] for l in layers}
    for _ in range(rounds):
        for l in layers:
            ts[l].append(once(l))
    return {l: float(np.min(v) * 1e3) for l, v in ts.items()}


@torch.no_grad()
def alignment(vit, lm, world, vocab, cfg, device):
    """Mutual k-NN and linear CKA between every ViT layer (mean-pooled patches) and every LM layer
    (mean-pooled over caption tokens), on n = n_eval val pairs; with a shuffled-pairs null and a
    random-init LM control."""
    va = world["val"]
    n = len(va["captions"])
    vis = [h.mean(1).float().cpu() for h in vit(torch.from_numpy(va["images"]).to(device))]   # per layer (n, C)

    def lm_feats(model):
        out = [[] for _ in model.blocks]
        for i in range(0, n, 256):
            seqs = [encode(vocab, c, bos=True) for c in va["captions"][i:i + 256]]
            x = pad(seqs, vocab["<pad>"]).to(device)
            keep = (x != vocab["<pad>"]).float()[..., None]
            keep[:, 0] = 0                                             # caption tokens only, not <bos>
            for j, h in enumerate(model.text_forward(x)[1]):
                out[j].append(((h * keep).sum(1) / keep.sum(1)).float().cpu())
        return [torch.cat(o) for o in out]

    torch.manual_seed(12345)
    rand_lm = LM(len(vocab), cfg).to(device).eval()
    txt, txt_rand = lm_feats(lm), lm_feats(rand_lm)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    k = min(cfg.knn_k, n - 2)
    res = {}
    for name, lm_layers, shuffle in (("trained", txt, False), ("shuffled_null", txt, True), ("random_lm", txt_rand, False)):
        res[f"knn_{name}"] = [[mutual_knn(v, t[perm] if shuffle else t, k) for t in lm_layers] for v in vis]
        res[f"cka_{name}"] = [[linear_cka(v, t[perm] if shuffle else t) for t in lm_layers] for v in vis]
    res["chance_knn"] = k / (n - 1)
    res["n"] = n
    return res


# ----------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: CUDA is not available on this machine")
    if name not in ("cpu", "cuda", "mps"):
        raise BadInput(f"--device: expected auto, cpu, cuda or mps, got {name!r}")
    return torch.device(name)


def validate(cfg):
    for f in ("n_train", "n_eval", "patch", "vit_dim", "vit_layers", "image_tokens", "d_model", "n_layer",
              "n_head", "max_len", "batch_size", "knn_k"):
        if getattr(cfg, f) <= 0:
            raise BadInput(f"--{f.replace('_', '-')} must be positive, got {getattr(cfg, f)}")
    for f in ("clip_steps", "lm_steps", "stage1_steps", "stage2_steps"):
        if getattr(cfg, f) < 0:
            raise BadInput(f"--{f.replace('_', '-')} must be >= 0, got {getattr(cfg, f)}")
    if not -1 <= cfg.insert_layer < cfg.n_layer:
        raise BadInput(f"--insert-layer must be in [0, {cfg.n_layer}) (or -1 for the sweep), got {cfg.insert_layer}")
    for d, h in ((cfg.d_model, cfg.n_head), (cfg.vit_dim, cfg.n_head)):
        if d % h or (d // h) % 2:
            raise BadInput(f"width {d} must be a multiple of 2*--n-head ({2 * cfg.n_head})")
    seeds = validate_image_and_run(cfg)
    layers = [cfg.insert_layer] if cfg.insert_layer >= 0 else sorted({0, cfg.n_layer // 4, cfg.n_layer // 2})
    return seeds, layers


def validate_image_and_run(cfg):
    """Checks shared by the multimodal paper files (image, dtype, data, seeds) -> the list of seeds."""
    if cfg.image_size % cfg.patch:
        raise BadInput(f"--image-size {cfg.image_size} must be a multiple of --patch {cfg.patch}")
    m = int(round(math.sqrt(cfg.image_tokens)))
    if m * m != cfg.image_tokens or m > cfg.image_size // cfg.patch:
        raise BadInput(f"--image-tokens must be a square number <= the patch grid ({(cfg.image_size // cfg.patch) ** 2})")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise BadInput(f"--dtype: expected float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.data_dir and not os.path.isdir(cfg.data_dir):
        raise BadInput(f"--data-dir {cfg.data_dir}: no such directory")
    try:
        return [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise BadInput(f"--seeds must be comma-separated integers, got {cfg.seeds!r}")


def backbones(world, vocab, cfg, device):
    """Pretrain (or load from the cache in --out) the frozen ViT and LM."""
    keys = ("n_train", "image_size", "data_dir", "patch", "vit_dim", "vit_layers", "d_model", "n_layer", "n_head",
            "max_len", "clip_steps", "lm_steps", "batch_size", "lr", "dtype")
    tag = "_".join(str(getattr(cfg, k)) for k in keys)
    path = os.path.join(cfg.out, f"backbones_{abs(hash_str(tag + str(len(vocab)))):x}.pt")
    vit, lm = ViT(cfg).to(device), LM(len(vocab), cfg).to(device)
    if os.path.exists(path):
        ck = torch.load(path, map_location=device, weights_only=True)
        vit.load_state_dict(ck["vit"])
        lm.load_state_dict(ck["lm"])
        print(f"loaded cached backbones from {path}")
        return vit.eval(), lm.eval(), ck["quality"]
    torch.manual_seed(0)
    t = time.perf_counter()
    vit, r1 = pretrain_clip(world, vocab, cfg, device)
    lm, qa = pretrain_lm(world, vocab, cfg, device)
    quality = dict(vit_retrieval_r1=r1, lm_text_qa_acc=qa, pretrain_s=time.perf_counter() - t)
    os.makedirs(cfg.out, exist_ok=True)
    torch.save(dict(vit=vit.state_dict(), lm=lm.state_dict(), quality=quality), path + ".tmp")
    os.replace(path + ".tmp", path)
    return vit, lm, quality


def hash_str(s):
    """A stable (process-independent) string hash for cache file names."""
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return h


ZERO_RETRAIN_SCENES = 256   # test scenes for the zero-retrain curve (N evaluations of the l = 0 model)
PREFILL_BATCH = 256         # prompts in the prefill timing batch (larger = less timer noise)


def run(cfg):
    seeds, layers = validate(cfg)
    device = pick_device(cfg.device)
    torch.manual_seed(0)
    world, vocab = load_world(cfg)
    print(f"device {device}, vocab {len(vocab)}, train {len(world['train']['captions'])} scenes, "
          f"LM N={cfg.n_layer} D={cfg.d_model}, image tokens M={cfg.image_tokens}, l in {layers}, seeds {seeds}")
    vit, lm, quality = backbones(world, vocab, cfg, device)
    print(f"frozen backbones: ViT image->caption R@1 {quality['vit_retrieval_r1']:.3f} (chunks of 100), "
          f"LM text-only QA {quality['lm_text_qa_acc']:.3f}")
    align = alignment(vit, lm, world, vocab, cfg, device)
    feats = {s: vit_tokens(vit, world[s]["images"], cfg, device) for s in world if len(world[s]["captions"])}

    # FLOPs and prefill time on a batch of test QA prompts (right-padded to one length)
    te = world["test"]
    prompts = [p for _, p, _, _ in qa_items(te, vocab)[:PREFILL_BATCH]]
    ids = pad(prompts, vocab["<pad>"]).to(device)
    T, M, N, D = ids.shape[1], cfg.image_tokens, cfg.n_layer, cfg.d_model
    img = torch.randn(len(prompts), M, D, device=device)
    cost_layers = sorted(set(layers) | {0, N // 4, N // 2})
    ms = prefill_ms(lm, img, ids, cost_layers)
    base_counted = counted_prefill_flops(lm, img[:1], ids[:1], 0)
    cost = {}
    for l in cost_layers:
        counted = counted_prefill_flops(lm, img[:1], ids[:1], l)
        analytic = prefill_flops(T, M, N, l, D, 4 * D)
        cost[l] = dict(flops_analytic=analytic, flops_counted=counted,
                       saving_analytic=1 - analytic / prefill_flops(T, M, N, 0, D, 4 * D),
                       saving_counted=1 - counted / base_counted, prefill_ms=ms[l], saving_wall=1 - ms[l] / ms[0])

    runs = []
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.cost_only:
        for l, c in cost.items():
            print(f"l={l}: FLOPs saved {c['saving_analytic'] * 100:.1f}% (formula) / {c['saving_counted'] * 100:.1f}% "
                  f"(counted); prefill {c['prefill_ms']:.2f} ms, wall saved {c['saving_wall'] * 100:.1f}%")
        write_results(cfg, quality, align, cost, runs)
        return runs
    for seed in seeds:
        for l in layers:
            model, timing = train_bridge(lm, feats, world, vocab, cfg, l, seed, device)
            acc, per_type = qa_accuracy(model, feats["test"], world["test"], vocab, l, device)
            hold = qa_accuracy(model, feats["holdout"], world["holdout"], vocab, l, device)[0] \
                if len(world["holdout"]["captions"]) else None
            r = dict(seed=seed, insert_layer=l, qa_acc=acc, qa_per_type=per_type, holdout_acc=hold,
                     caption_acc=caption_token_acc(model, feats["test"], world["test"], vocab, l, device),
                     **timing, **cost.get(l, {}))
            if l == 0:  # zero-retrain: the l = 0 model with the insertion moved deeper, no finetuning
                sub = {k: v[:ZERO_RETRAIN_SCENES] for k, v in world["test"].items() if k != "objects"}
                r["zero_retrain"] = {lp: qa_accuracy(model, feats["test"], sub, vocab, lp, device)[0]
                                     for lp in range(N)}
            print(f"seed {seed} l={l}: QA {acc:.3f} hold-out {hold if hold is None else round(hold, 3)} "
                  f"caption {r['caption_acc']:.3f} ({timing['train_s']:.0f}s)")
            runs.append(r)
            torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(cfg.out, f"bridge_l{l}_seed{seed}.pt"))
            write_results(cfg, quality, align, cost, runs)
    report(cfg, quality, align, cost, runs, layers)
    # what the last bridge says about three test images (greedy, KV cache: layers < l cache text only)
    te_caps = [encode(vocab, "caption:") for _ in range(3)]
    gen = model.generate(feats["test"][:3].to(device), torch.tensor(te_caps, device=device), l, max_new=24)
    inv = {i: w for w, i in vocab.items()}
    for i, row in enumerate(gen.tolist()):
        words = [inv[t] for t in row]
        said = " ".join(words[: words.index("<eos>")] if "<eos>" in words else words)
        print(f"  image {i}: true '{world['test']['captions'][i]}'\n           said '{said}'  (l={l})")
    return runs


def write_results(cfg, quality, align, cost, runs):
    path = os.path.join(cfg.out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(config=asdict(cfg), backbones=quality, alignment=align,
                       cost={str(k): v for k, v in cost.items()}, runs=runs), f, indent=1)
    os.replace(path + ".tmp", path)


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{np.mean(xs):.3f}" + (f" ± {np.std(xs):.3f}" if len(xs) > 1 else "")


def report(cfg, quality, align, cost, runs, layers):
    N = cfg.n_layer
    vit_rows = [f"v{i}" for i in range(cfg.vit_layers)]
    lm_cols = [f"{j}" for j in range(N)]
    print()
    for name in ("trained", "shuffled_null", "random_lm"):
        print(heatmap(np.array(align[f"knn_{name}"]), vit_rows, lm_cols,
                      f"mutual k-NN, ViT layer (rows) x LM layer (cols): {name} (chance {align['chance_knn']:.3f})"))
    print(heatmap(np.array(align["cka_trained"]), vit_rows, lm_cols, "linear CKA: trained"))
    print()
    head = f"{'l':>3s} {'QA acc':>15s} {'hold-out':>15s} {'caption':>15s} {'FLOPs saved (formula/counted)':>30s} {'prefill ms':>11s} {'wall saved':>10s} {'stage2 ms/step':>14s}"
    print(head)
    print("-" * len(head))
    for l in layers:
        rs = [r for r in runs if r["insert_layer"] == l]
        c = cost[l]
        print(f"{l:>3d} {mean_std([r['qa_acc'] for r in rs]):>15s} {mean_std([r['holdout_acc'] for r in rs]):>15s} "
              f"{mean_std([r['caption_acc'] for r in rs]):>15s} "
              f"{c['saving_analytic'] * 100:>14.1f}% / {c['saving_counted'] * 100:5.1f}%      "
              f"{c['prefill_ms']:>11.2f} {c['saving_wall'] * 100:>9.1f}% {mean_std([r['stage2_step_ms'] for r in rs]):>14s}")
    types = sorted({t for r in runs for t in r["qa_per_type"]})
    print("QA accuracy per question type: " + "  ".join(
        f"l={l}: " + ", ".join(f"{t} {np.mean([r['qa_per_type'][t] for r in runs if r['insert_layer'] == l]):.2f}"
                                for t in types) for l in layers))
    zr = [r["zero_retrain"] for r in runs if "zero_retrain" in r]
    if zr:
        print("zero-retrain (l=0 model, insertion moved to l', no finetune): " +
              "  ".join(f"l'={lp}: {np.mean([z[lp] for z in zr]):.3f}" for lp in range(N)))
    print(f"results: {os.path.join(cfg.out, 'results.json')}")


def cli(argv, config_cls, helps, doc, run_fn, prog):
    """One --flag per Config field (help from HELP), then run_fn(cfg); a BadInput is one line on stderr and
    exit status 2. Shared by the multimodal paper files."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for k, v in asdict(config_cls()).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            ap.add_argument(flag, action="store_true", help=helps[k])
        else:
            ap.add_argument(flag, type=type(v), default=v, help=helps[k])
    cfg = config_cls(**vars(ap.parse_args(argv)))
    try:
        return run_fn(cfg)
    except BadInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    return cli(argv, Config, HELP, __doc__, run, "multimodal_align.py")


if __name__ == "__main__":
    main()

"""DeepInsert (Platonic grounding): image tokens enter the language model at a deeper layer.

Paper: Choraria et al., "DeepInsert: Early Layer Bypass for Efficient and Performant Multimodal
Understanding" (v1 "Platonic Grounding for Efficient Multimodal Language Models"), arXiv 2504.19327,
EACL 2026; restated in ../shared/papers/multimodal_align.md. Alignment metric: Huh et al. 2024,
"The Platonic Representation Hypothesis" (mutual k-NN); linear CKA: Kornblith et al. 2019.

The argument in one file, on the shapes world v2 (data/shapes.py), where answers need binding:
  1. two frozen backbones: the shared ViT of data/vision.py (gate: minimal pairs >= 0.9) and a
     decoder-only LM (RoPE, Primer's causal conv on q/k/v) pretrained here on text alone (gate:
     text ceiling >= 0.95 per type); a failed gate stops the run (--ignore-gates: train anyway);
  2. a LLaVA-style bridge (an MLP projector writes each cell's ViT token as a few LM tokens; stage 1
     trains it alone on captions, stage 2 it and the LM on QA, keeping the best weights on val) in
     which the image tokens enter at layer l instead of 0: text alone runs through layers 0..l-1; at
     layer l the image tokens are spliced in at their original positions (RoPE positions kept);
     the merged sequence runs l..N-1. A real skip, not a mask: the KV cache below l holds text only;
  3. what it buys: prefill FLOPs (formula, counted), wall clock, and QA per type against a no-image
     control and the data-only baselines (blind prior; bag-of-words oracle, * at or below it);
  4. how the two backbones' layers line up on a binding-controlled set (mutual k-NN, CKA, nulls).
The paper reads top to bottom; the command line, checks and reports come after "Plumbing".

    python multimodal_align.py                  # l in {0, N/4, N/2, 3N/4} + no-image, seed 0
    python multimodal_align.py --seeds 0,1,2    # three bridge seeds (backbones from the cache)
    python multimodal_align.py --seeds 0,1,2 --vary-backbones   # train scenes, backbones per seed
    python multimodal_align.py --quick          # every section on a tiny config, under a minute
    python multimodal_align.py --data-dir DIR   # real data: DIR/images.npy + annotations.jsonl

Shape legend:
    B = batch   M = image tokens   T = text tokens   L = sequence length (M + T)
    D = LM width   V = vocabulary   C = ViT width   N = LM layers   l = insert layer
Sequence layout (LLaVA): [<bos>] [image x M] [question: ... answer:] [answer] [<eos>].
"""

import copy
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import vision
from data.layers import Block, RMSNorm, batches, encode, pad, train_loop
from data.multimodal import (BACKBONES, BRIDGE, EXPERIMENT, MultimodalConfig, backbone_seed,
                             cached_lm, exact_match, gate_or_stop, out_flag, save_bridge,
                             shapes_baselines, shapes_world, text_ceiling_line,
                             validate_image_and_run)
from data.run import (BadInput, check_numbers, flag, heatmap, heatmap_grid, interleaved_ms,
                      keep_previous, log_metrics, main as run_main, mean_sd, mean_std, parse_flags,
                      pick_device, print_outputs, pyplot, save_png, write_results)
from data.shapes import (QUESTION_TYPES, at_or_below_oracle, binding_controlled, binding_score,
                         generate, oracle_reference, scene_grid)


# ---- The LM and the splice -----------------------------------------------------------------------

class LMBlock(Block):
    """The shared block (data/layers.py) plus the two hooks deep insertion needs. cache: a dict
    that receives this call's keys and values (and the last K-1 rows the conv needs) and, when it
    holds some, is attended to first (decoding one token at a time after the prefill). prev_L: each
    position's predecessor for the conv (the masked reference: text skips the image slots)."""

    def mix(self, z_BLC, prev_L=None, cache=None):
        """z'_i = sum_k w_k * z_(k-th predecessor of i); predecessor = i-1 unless prev_L says
        otherwise, none (zero) before the start. A cache keeps the last K-1 rows for the next
        call."""
        K, n_old = self.mix_w.shape[1], 0
        if cache is not None:
            if "z" in cache:
                n_old = cache["z"].shape[1]
                z_BLC = torch.cat([cache["z"], z_BLC], 1)
            cache["z"] = z_BLC[:, -(K - 1):]
        if prev_L is None:                             # predecessor = i - 1: the shifted copies
            return super().mix(z_BLC)[:, n_old:]
        out = z_BLC * self.mix_w[:, 0]
        idx = torch.arange(z_BLC.shape[1], device=z_BLC.device)
        for k in range(1, K):
            idx = torch.where(idx >= 0, prev_L[idx.clamp(min=0)], idx)         # k-th predecessor
            out = out + (z_BLC[:, idx.clamp(min=0)] * (idx >= 0)[None, :, None]) * self.mix_w[:, k]
        return out[:, n_old:]

    def forward(self, x_BLD, pos_L=None, mask_LL=None, cache=None, prev_L=None):
        """mask_LL: boolean 'may attend' (overrides causal; the masked reference)."""
        q, k, v = self.attn_qkv(x_BLD, pos_L, prev_L=prev_L, cache=cache)
        if cache is not None and "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        if mask_LL is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL)
        else:  # decoding one token with a cache: it may see everything cached
            y = F.scaled_dot_product_attention(q, k, v,
                                               is_causal=self.causal and q.shape[2] == k.shape[2])
        return self.finish(x_BLD, y)


class LM(nn.Module):
    """Decoder-only LM (LMBlock: pre-norm, RoPE, causal); deep_insert_blocks enters its stack."""

    def __init__(self, V, cfg):
        super().__init__()
        self.emb = nn.Embedding(V, cfg.d_model)
        self.blocks = nn.ModuleList(LMBlock(cfg.d_model, cfg.n_head, causal=True, mix=cfg.lm_mix)
                                    for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, V, bias=False)

    def text_forward(self, ids_BT):
        """Text alone -> logits (B, T, V), hidden states [embedding, block 0, ..., block N-1]."""
        h = self.emb(ids_BT)
        pos = torch.arange(ids_BT.shape[1], device=ids_BT.device)
        hs = [h]
        for blk in self.blocks:
            h = blk(h, pos)
            hs.append(h)
        return self.head(self.norm(h)), hs


def splice(h_BTD, img_BMD):
    """Insert the image tokens after <bos>: (B, 1+M+T-1, D). Positions are the original ones."""
    return torch.cat([h_BTD[:, :1], img_BMD.to(h_BTD.dtype), h_BTD[:, 1:]], 1)


def deep_insert_blocks(blocks, h_BTD, img_BMD, insert_layer, caches=None):
    """The DeepInsert forward through the block stack (prefill).
    Layers < l: text alone at positions [0, M+1, M+2, ...]; at layer l the image tokens are spliced
    in at positions 1..M; layers >= l see the merged sequence. caches: optional per-layer dicts."""
    M, T = img_BMD.shape[1], h_BTD.shape[1]
    pos_all = torch.arange(M + T, device=h_BTD.device)
    pos_text = torch.cat([pos_all[:1], pos_all[M + 1:]])
    h, pos = h_BTD, pos_text
    for i, blk in enumerate(blocks):
        if i == insert_layer:
            h, pos = splice(h, img_BMD), pos_all
        h = blk(h, pos, cache=None if caches is None else caches[i])
    return h


class Bridge(nn.Module):
    """LLaVA-style model: frozen ViT cell tokens -> 2-layer MLP projector -> LM (entered at l)."""

    def __init__(self, lm, cfg):
        super().__init__()
        self.lm = lm
        self.k = cfg.tokens_per_cell
        self.proj = nn.Sequential(nn.Linear(cfg.vit_dim, cfg.d_model), nn.GELU(),
                                  nn.Linear(cfg.d_model, self.k * cfg.d_model))

    def project(self, feats_BGC):
        """G ViT tokens (one per cell) -> M = G*k LM tokens, each cell's k in a row: the projector
        may write a cell as a short phrase, the way the caption writes an object as 'size colour
        shape cell' (k = 1: the usual one token per visual token). -> (B, G*k, D); G may be 0."""
        return self.proj(feats_BGC).unflatten(-1, (self.k, -1)).flatten(1, 2)

    def forward(self, feats_BMC, ids_BT, insert_layer):
        """ids_BT starts with <bos>; returns logits for the text positions only: (B, T, V)."""
        img = self.project(feats_BMC)
        h = deep_insert_blocks(self.lm.blocks, self.lm.emb(ids_BT), img, insert_layer)
        M = img.shape[1]
        h_text = torch.cat([h[:, :1], h[:, 1 + M:]], 1)                  # drop the image positions
        return self.lm.head(self.lm.norm(h_text))

    def masked_reference(self, feats_BMC, ids_BT, insert_layer):
        """Slow oracle: the full [bos, image, text] sequence through every layer; below l text and
        image positions attend only to their own kind, at layer l the image positions are
        overwritten with the projected tokens. Must equal forward() on the text positions."""
        img = self.project(feats_BMC)
        M, T = img.shape[1], ids_BT.shape[1]
        h = splice(self.lm.emb(ids_BT), torch.zeros_like(img))
        is_img = torch.zeros(M + T, dtype=torch.bool)
        is_img[1:1 + M] = True
        causal = torch.ones(M + T, M + T, dtype=torch.bool).tril()
        early = causal & (is_img[:, None] == is_img[None, :])   # text<->text, image<->image only
        pos = torch.arange(M + T)
        prev_early = pos - 1               # the mix's predecessor: the first text token after the
        prev_early[1 + M] = 0              # image slots follows <bos>
        for i, blk in enumerate(self.lm.blocks):
            if i == insert_layer:
                h = torch.cat([h[:, :1], img, h[:, 1 + M:]], 1)
            h = blk(h, pos, mask_LL=early if i < insert_layer else causal,
                    prev_L=prev_early if i < insert_layer else None)
        return self.lm.head(self.lm.norm(torch.cat([h[:, :1], h[:, 1 + M:]], 1)))

    @torch.no_grad()
    def generate(self, feats_BMC, ids_BT, insert_layer, max_new, use_cache=True):
        """Greedy decoding. With the cache, layers < l hold the text's keys/values only."""
        if not use_cache:
            out = ids_BT
            for _ in range(max_new):
                nxt = self.forward(feats_BMC, out, insert_layer)[:, -1].argmax(-1, keepdim=True)
                out = torch.cat([out, nxt], 1)
            return out[:, ids_BT.shape[1]:]
        img = self.project(feats_BMC)
        M, caches = img.shape[1], [dict() for _ in self.lm.blocks]
        h = deep_insert_blocks(self.lm.blocks, self.lm.emb(ids_BT), img, insert_layer, caches)
        nxt = self.lm.head(self.lm.norm(h[:, -1:])).argmax(-1)
        new = [nxt]
        for step in range(1, max_new):   # each new token at its place in [bos, image, text]
            pos = torch.tensor([M + ids_BT.shape[1] + step - 1], device=ids_BT.device)
            h = self.lm.emb(nxt)
            for blk, c in zip(self.lm.blocks, caches):
                h = blk(h, pos, cache=c)
            nxt = self.lm.head(self.lm.norm(h)).argmax(-1)
            new.append(nxt)
        return torch.cat(new, 1)


# ---- FLOPs: the paper's formula and the counter --------------------------------------------------

def layer_flops(L, D, d_ff):
    """Per layer, sequence length L: QKV 6LD^2 + attention 4L^2D + out-proj 2LD^2 + FFN 4LD*d_ff."""
    return 6 * L * D ** 2 + 4 * L ** 2 * D + 2 * L * D ** 2 + 4 * L * D * d_ff


def prefill_flops(T, M, N, l, D, d_ff):
    """FLOPs(l) = l*F(T) + (N-l)*F(T+M)   (per sequence; blocks only, no embedding or head)."""
    return l * layer_flops(T, D, d_ff) + (N - l) * layer_flops(T + M, D, d_ff)


def counted_prefill_flops(lm, img_BMD, ids_BT, l):
    """torch.utils.flop_counter over the block stack, under the math SDPA kernel: CPU's default
    kernel counts attention as 0, the math kernel as non-causal, like the formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        deep_insert_blocks(lm.blocks, lm.emb(ids_BT), img_BMD, l)
    return fc.get_total_flops()


# ---- Alignment metrics (the Platonic Representation Hypothesis' protocol) ------------------------

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
    return ((b.T @ a).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm() + 1e-30)).item()


# ---- The texts and the QA batches ----------------------------------------------------------------

def qa_prompt(q):
    return f"question: {q} answer:"


def lm_texts(ds, rng, per_context=5, caption_every=8):
    """Text-only LM corpus: per scene one context, then its questions with answers in random order,
    'context: <c> question: q1 answer: a1 question: q2 answer: a2 ...' (the LM must bind from text);
    every caption_every-th scene also 'caption: <c>' (the prompt of the captioning stage)."""
    out = []
    for n, (c, qa) in enumerate(zip(ds["captions"], ds["qa"])):
        if n % caption_every == 0:
            out.append(f"caption: {c}")
        order = rng.permutation(len(qa))
        for i in range(0, len(order), per_context):
            out.append(f"context: {c} " + " ".join(f"{qa_prompt(qa[j]['q'])} {qa[j]['a']}"
                                                   for j in order[i:i + per_context]))
    return out


def qa_items(ds, vocab, prefix=""):
    """(scene index, prompt ids, answer id, type) for every question."""
    unk = vocab["<unk>"]
    return [(i, encode(vocab, prefix + qa_prompt(d["q"])), vocab.get(d["a"], unk), d["type"])
            for i, qa in enumerate(ds["qa"]) for d in qa]


def qa_batch(items, vocab):
    """Teacher forcing for QA: input [bos question: q answer: a], target at input position i = token
    i+1, kept only for the answer and <eos> (the loss is on the answer)."""
    pad_id = vocab["<pad>"]
    x = pad([p + [a, vocab["<eos>"]] for _, p, a, _ in items], pad_id)
    tgt = torch.full_like(x, pad_id)
    for j, (_, p, a, _) in enumerate(items):
        tgt[j, len(p) - 1], tgt[j, len(p)] = a, vocab["<eos>"]   # "answer:" -> a, a -> <eos>
    return x[:, :-1], tgt[:, :-1]


# ---- The frozen LM: pretraining and its text ceiling ---------------------------------------------

def answer_mask(ids_BT, vocab):
    """True at targets that are answers (the token after 'answer:')."""
    m = torch.zeros_like(ids_BT, dtype=torch.bool)
    m[:, 1:] = ids_BT[:, :-1] == vocab["answer:"]
    return m


def pretrain_lm(world, vocab, cfg, device, metrics=None, seed=0):
    """The recipe that reaches the text-ceiling gate (what did not: docs/multimodal_align.md,
    "Where we differ"):
    --lm-scenes fresh text-only scenes (--data-dir: its train split), a scene's questions packed
    after its context, loss = answer CE + 0.1 x next-token CE on every token (an answer is ~1
    target in 14), --lm-lr, Primer's conv in every block (--lm-mix). seed: the LM's own seed
    (initialisation, text scenes, order; data/multimodal.backbone_seed)."""
    torch.manual_seed(seed)
    lm = LM(len(vocab), cfg).to(device)
    src = (world["train"] if cfg.data_dir
           else generate(cfg.lm_scenes, "train", seed=7 + seed, images=False))
    ids = pad([encode(vocab, t, eos=True) for t in lm_texts(src, np.random.default_rng(seed))],
              vocab["<pad>"])
    it = batches(len(ids), min(cfg.batch_size, len(ids)), seed=2 + seed)
    pad_id = vocab["<pad>"]

    def loss_fn(step):
        x = ids[next(it)].to(device)
        x = x[:, : int((x != pad_id).sum(1).max())]
        logits, _ = lm.text_forward(x[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), ignore_index=pad_id,
                             reduction="none")
        ans = answer_mask(x, vocab)[:, 1:].flatten().float()
        return ((ce * ans).sum() / ans.sum().clamp(min=1)
                + 0.1 * ce.sum() / (x[:, 1:] != pad_id).sum())

    # data/layers.train_loop: AdamW, linear warm-up, cosine decay, a progress bar; loss_fn(step)
    train_loop(list(lm.parameters()), loss_fn, cfg.lm_steps, cfg, "lm", device, lr=cfg.lm_lr,
               metrics=metrics)
    return lm.eval()


LM_CODE = (LMBlock, LM, qa_prompt, lm_texts, answer_mask, pretrain_lm)  # in the LM's cache key


def frozen_lm(world, vocab, cfg, device, metrics=None, seed=0):
    """Pretrain the LM or load it from --cache-dir (keyed by its config, a digest of its corpus, its
    build and, in the file name, its seed)."""
    keys = ("d_model", "n_layer", "n_head", "lm_mix", "lm_steps", "lm_scenes", "lm_lr", "dtype")
    return cached_lm(world, vocab, cfg, keys, "lm" if seed == 0 else f"lm_seed{seed}",
                     lambda: LM(len(vocab), cfg),
                     lambda: pretrain_lm(world, vocab, cfg, device, metrics, seed), device,
                     code=LM_CODE)


@torch.no_grad()
def text_ceiling(lm, ds, vocab, device, bs=256):
    """Per question type, the frozen LM's QA with the true caption as context ('context: <c>
    question: q answer:'): what a bridge could do if its image tokens said what the caption says."""
    items = [(0, encode(vocab, f"context: {c} {qa_prompt(d['q'])}"), vocab.get(d["a"], -1),
              d["type"]) for c, qa in zip(ds["captions"], ds["qa"]) for d in qa]
    return answer_hits(lambda ix, x: lm.text_forward(x)[0], items, vocab, device, bs)[1]


def answer_hits(logits_fn, items, vocab, device, bs=256):
    """Exact match of a one-word answer, the argmax at each prompt's last position (overall, per
    type). items: (index, prompt ids, answer id, type); logits_fn(indices, prompts) -> (B, T, V)."""
    def predict(chunk):
        x = pad([p for _, p, _, _ in chunk], vocab["<pad>"]).to(device)
        logits = logits_fn([j for j, *_ in chunk], x)
        last = torch.tensor([len(p) - 1 for _, p, _, _ in chunk], device=device)
        return logits[torch.arange(len(chunk), device=device), last].argmax(-1)
    return exact_match(predict, items, bs)


GATE_TEXT = 0.95   # the frozen LM's text ceiling, per question type, before any bridge trains on it


def backbones(cfg, world, vocab, device, metrics, seed):
    """The world's training scenes and both frozen backbones for backbone seed `seed`
    (data/multimodal.backbone_seed; seed 0 = the world of load_world): the ViT (gate: minimal
    pairs) and the LM (gate: text ceiling). A failed gate stops the run here, before any bridge
    trains on it. -> dict(seed, world, vit, feats, lm, gates)."""
    if seed and not cfg.data_dir:
        world = dict(world, train=generate(cfg.n_train, "train", seed=seed, size=cfg.image_size))
    # the cached (or pretrained) ViT, its tokens per split (N, P, C) and its gate report
    vit, feats, gates = vision.frozen_tokens(cfg, world, device, metrics, seed=seed)
    lm = frozen_lm(world, vocab, cfg, device, metrics, seed=seed)
    ceiling = text_ceiling(lm, world["val"], vocab, device)     # val: the gate is a decision
    gate_or_stop(cfg, min(ceiling.values()) >= GATE_TEXT, text_ceiling_line(ceiling, GATE_TEXT))
    return dict(seed=seed, world=world, vit=vit, feats=feats, lm=lm,
                gates=dict(gates, lm_text_ceiling=ceiling))


# ---- The bridge: two training stages, then evaluation --------------------------------------------

def train_bridge(lm0, feats, world, vocab, cfg, l, seed, device, name="", metrics=None,
                 val_feats=None):
    """Stage 1 (projector only, captioning) then stage 2 (projector + LM, QA and captions),
    inserting at l. feats with 0 tokens per scene (the no-image control): stage 2 alone. val_feats:
    the val split's tokens, for early stopping. name: the run in progress lines and metrics.jsonl.
    -> (model, training seconds, stage 2's val record or None)."""
    torch.manual_seed(seed)
    model = Bridge(copy.deepcopy(lm0), cfg).to(device)
    if cfg.compile:   # in place: parameter names (and checkpoints) keep no _orig_mod. prefix
        for blk in model.lm.blocks:
            blk.compile()
    tr, pad_id = world["train"], vocab["<pad>"]
    caps = [encode(vocab, "caption: " + c, eos=True) for c in tr["captions"]]
    qas = qa_items(tr, vocab)

    def caption_loss(b):
        x = pad([caps[i] for i in b], pad_id).to(device)
        logits = model(feats[b].to(device), x[:, :-1], l)
        return F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(),
                               ignore_index=pad_id)

    def qa_loss(items):
        inp, tgt = qa_batch(items, vocab)
        logits = model(feats[[i for i, *_ in items]].to(device), inp.to(device), l)
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt.to(device).flatten(),
                               ignore_index=pad_id)

    it_cap = batches(len(caps), cfg.batch_size, seed=seed * 10 + 3)                    # stage 1
    it_cap2 = batches(len(caps), max(1, cfg.batch_size // 4), seed=seed * 10 + 5)      # stage 2
    it_qa = batches(len(qas), cfg.batch_size, seed=seed * 10 + 4)                      # stage 2

    def stage2_loss(step):   # QA, plus a quarter-size caption batch: it keeps describing scenes
        return qa_loss([qas[i] for i in next(it_qa)]) + 0.5 * caption_loss(next(it_cap2))

    val_qa = None if val_feats is None else (
        lambda: qa_accuracy(model.eval(), val_feats, world["val"], vocab, l, device)[0])
    t0 = time.perf_counter()
    stage1(model, lambda s: caption_loss(next(it_cap)), cfg, feats.shape[1], name, device, metrics)
    val = stage2(model, stage2_loss, val_qa, cfg, name, device, metrics)
    return model.eval(), time.perf_counter() - t0, val


def stage1(model, loss_fn, cfg, n_tokens, name, device, metrics):
    """Stage 1: the projector alone learns to caption each scene from its image tokens, the LM
    frozen; skipped when there are no image tokens (n_tokens = 0: the no-image control)."""
    model.lm.requires_grad_(False)
    train_loop(list(model.proj.parameters()), loss_fn, cfg.stage1_steps if n_tokens else 0, cfg,
               f"{name} stage1", device, metrics=metrics)
    model.lm.requires_grad_(True)


def stage2(model, loss_fn, val_qa, cfg, name, device, metrics):
    """Stage 2: projector and LM together. val_qa() -> QA on the val split: every --eval-every steps
    and at the end; the bridge keeps the weights of its best val score (early stopping; the test
    split plays no part in it). -> {'step', 'qa', 'curve'} or None (no val_qa or --eval-every 0)."""
    val = dict(step=None, qa=-1.0, curve={}, state=None) if val_qa and cfg.eval_every else None

    def check_val(step):
        qa = val_qa()
        model.train()
        val["curve"][step] = qa
        if metrics:
            log_metrics(metrics, run=name, step=step, split="val", qa=qa)
        if qa > val["qa"]:
            val.update(step=step, qa=qa,
                       state={k: v.clone() for k, v in model.state_dict().items()})

    def loss_and_val(step):
        if val and step and step % cfg.eval_every == 0:   # train_loop has no hook: the loss sees it
            check_val(step)
        return loss_fn(step)

    train_loop(list(model.parameters()), loss_and_val, cfg.stage2_steps, cfg, f"{name} stage2",
               device, metrics=metrics)
    if val:
        check_val(cfg.stage2_steps)
        model.load_state_dict(val.pop("state"))
    return val


@torch.no_grad()
def qa_accuracy(model, feats, ds, vocab, l, device, bs=256):
    """Exact match of the one-word answer (argmax at the last prompt position): overall, by type."""
    return answer_hits(lambda ix, x: model(feats[ix].to(device), x, l), qa_items(ds, vocab), vocab,
                       device, bs)


ZERO_RETRAIN_SCENES = 200   # test scenes of the zero-retrain curve (N evaluations of the l=0 model)


def bridge_at(cfg, bb, world, vocab, l, seed, device, metrics, base, cost):
    """One bridge on the backbones bb at insert layer l (None: the no-image control, the same
    finetuning without image tokens), tested on test and hold-out; the l = 0 bridge also with its
    insertion moved deeper, untrained (zero-retrain). -> (model, its results)."""
    image = l is not None
    f = bb["feats"] if image else {s: v[:, :0] for s, v in bb["feats"].items()}  # 0 image tokens
    name = f"seed {seed} l={'none' if l is None else l}"
    model, train_s, val = train_bridge(bb["lm"], f["train"], bb["world"], vocab, cfg, l or 0, seed,
                                       device, name, metrics, val_feats=f.get("val"))
    overall, per_type = qa_accuracy(model, f["test"], world["test"], vocab, l or 0, device)
    hold = (qa_accuracy(model, f["holdout"], world["holdout"], vocab, l or 0, device)[0]
            if "holdout" in f else None)
    c, binding = cost.get(l, {}), binding_score(per_type)            # the control has no cost
    r = dict(insert_layer=l, image=image, seed=seed, backbone_seed=bb["seed"], overall=overall,
             binding_score=binding, per_type=per_type, holdout=hold, train_s=train_s, val=val,
             at_or_below_oracle=at_or_below_oracle(dict(per_type, binding=binding, overall=overall),
                                                   base["test"]["bag_oracle"]),
             **{k: c.get(k) for k in ("flops_saved_formula", "flops_saved_counted", "prefill_ms")})
    if l == 0:
        sub = {k: v[:ZERO_RETRAIN_SCENES] for k, v in world["test"].items() if k != "images"}
        r["zero_retrain"] = {lp: qa_accuracy(model, f["test"], sub, vocab, lp, device)[0]
                             for lp in range(cfg.n_layer)}
    print(f"{name}: QA {overall:.3f} binding {binding:.3f} "
          f"hold-out {'-' if hold is None else f'{hold:.3f}'} ({train_s:.0f}s)"
          + ("" if val is None else f", best val QA {val['qa']:.3f} at stage-2 step {val['step']}")
          + (f"; at or below the bag-of-words oracle: {', '.join(r['at_or_below_oracle'])}"
             if r["at_or_below_oracle"] else ""))
    return model, r


# ---- What deep insertion buys, and how the backbones line up -------------------------------------

@torch.no_grad()
def prefill_ms(lm, img_BMD, ids_BT, layers, rounds=15):
    """Wall time (ms) of the block-stack prefill at each l, the l's interleaved (the median)."""
    fns = {l: lambda r, l=l: deep_insert_blocks(lm.blocks, lm.emb(ids_BT), img_BMD, l)
           for l in layers}
    return interleaved_ms(fns, img_BMD.device, rounds)


def cost_table(lm, world, vocab, cfg, layers, device):
    """Prefill FLOPs (formula and counter, one test prompt) and wall time (a batch of
    --prefill-batch) at each l. -> {l: dict}."""
    prompts = [p for _, p, _, _ in qa_items(world["test"], vocab)[:cfg.prefill_batch]]
    ids = pad(prompts, vocab["<pad>"]).to(device)
    T, M, N, D = ids.shape[1], cfg.image_tokens * cfg.tokens_per_cell, cfg.n_layer, cfg.d_model
    img = torch.randn(len(prompts), M, D, device=device)
    ms = prefill_ms(lm, img, ids, layers, rounds=3 if cfg.quick else 15)
    f = {l: prefill_flops(T, M, N, l, D, 4 * D) for l in layers}               # layers holds 0
    c = {l: counted_prefill_flops(lm, img[:1], ids[:1], l) for l in layers}
    return {l: dict(flops_formula=f[l], flops_counted=c[l], flops_saved_formula=1 - f[l] / f[0],
                    flops_saved_counted=1 - c[l] / c[0], prefill_ms=ms[l],
                    wall_saved=1 - ms[l] / ms[0], T=T, M=M) for l in layers}


@torch.no_grad()
def alignment(vit, lm, vocab, cfg, device):
    """Mutual k-NN and linear CKA between every ViT layer (cell tokens, flattened: a mean would
    erase the binding this set controls for) and every LM layer incl. the embeddings (mean over
    caption tokens), on the binding-controlled set; nulls: shuffled pairs and a random-init LM."""
    ds = binding_controlled(cfg.align_groups, 8, seed=0, size=cfg.image_size)
    n = len(ds["captions"])
    imgs = torch.from_numpy(ds["images"]).to(device)
    vis = [vision.pool_grid(h, 3).flatten(1).float().cpu() for h in vit(imgs)]   # per layer (n, 9C)

    def lm_feats(model):
        x = pad([encode(vocab, c) for c in ds["captions"]], vocab["<pad>"]).to(device)
        keep = (x != vocab["<pad>"]).float()[..., None]
        keep[:, 0] = 0                                           # caption tokens only, not <bos>
        return [((h * keep).sum(1) / keep.sum(1)).float().cpu() for h in model.text_forward(x)[1]]

    torch.manual_seed(12345)
    txt, txt_rand = lm_feats(lm), lm_feats(LM(len(vocab), cfg).to(device).eval())
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    k = min(cfg.knn_k, n - 2)
    res = dict(n=n, groups=cfg.align_groups, chance_knn=k / (n - 1), rows="ViT input, blocks 1..",
               cols="LM embedding, blocks 1..")
    for name, lm_layers in (("trained", txt), ("shuffled_null", [t[perm] for t in txt]),
                            ("random_lm", txt_rand)):
        res[f"knn_{name}"] = [[mutual_knn(v, t, k) for t in lm_layers] for v in vis]
        res[f"cka_{name}"] = [[linear_cka(v, t) for t in lm_layers] for v in vis]
    best = np.array(res["knn_trained"]).max(0)                       # best ViT layer, per LM layer
    res["rises_with_lm_depth"] = bool(best[-1] > best[0]
                                      and np.corrcoef(np.arange(len(best)), best)[0, 1] > 0.5)
    return res


# ---- The experiment ------------------------------------------------------------------------------

BASELINES = {"blind_prior": "blind prior", "bag_oracle": "bag-of-words oracle"}  # key: printed name


def experiment(cfg, seeds, layers, world, vocab, device, metrics):
    """The data-only baselines; the seed-0 backbones and the cost of each l; per seed a bridge at
    every l in layers (None: the no-image control), tested as it finishes; the alignment of the
    seed-0 backbones. -> the results dict."""
    print(f"device {device}, vocab {len(vocab)}, train {len(world['train']['captions'])} scenes, "
          f"LM N={cfg.n_layer} D={cfg.d_model}, image tokens M={cfg.image_tokens}x"
          f"{cfg.tokens_per_cell}, l in {layers}, seeds {seeds}"
          + (", backbones per seed" if cfg.vary_backbones else ""))
    base = shapes_baselines(world, cfg)
    for key, label in BASELINES.items():
        if base["test"][key] is not None:
            print(f"baseline {label}: "
                  + ", ".join(f"{t} {v:.3f}" for t, v in base["test"][key].items()))
    first = bb = backbones(cfg, world, vocab, device, metrics, backbone_seed(cfg, seeds[0]))
    cost = cost_table(first["lm"], world, vocab, cfg, sorted((set(layers) - {None}) | {0}), device)
    res = dict(config=asdict(cfg), baselines=base["test"], baselines_holdout=base.get("holdout"),
               gates=first["gates"], backbone_gates={str(first["seed"]): first["gates"]},
               cost={str(k): v for k, v in cost.items()}, runs=[])
    for seed in seeds:
        if backbone_seed(cfg, seed) != bb["seed"]:   # --vary-backbones: this seed's world etc.
            bb = backbones(cfg, world, vocab, device, metrics, backbone_seed(cfg, seed))
            res["backbone_gates"][str(bb["seed"])] = bb["gates"]
        for l in layers:
            model, r = bridge_at(cfg, bb, world, vocab, l, seed, device, metrics, base, cost)
            record(cfg, res, r, model, vocab, metrics)
    res["alignment"] = alignment(first["vit"], first["lm"], vocab, cfg, device)
    return res


# ---- Plumbing: command line, validation, results, reports ----------------------------------------

@dataclass
class Config(MultimodalConfig):
    """The shared fields (data, the backbones, seeds, device ...: data/multimodal.py), and these."""
    tokens_per_cell: int = flag(
        2, "LM tokens the projector writes per ViT token (M = image_tokens x this)", BRIDGE)
    n_layer: int = flag(4, "LM blocks N", BACKBONES)
    lm_steps: int = flag(4500, "LM pretraining steps", BACKBONES)
    stage1_steps: int = flag(200, "stage 1 steps: projector only, captioning", BRIDGE)
    stage2_steps: int = flag(
        1600, "stage 2 steps: projector + LM, QA and captions (chosen on val; the best val step is "
              "kept: see --eval-every)", BRIDGE)
    eval_every: int = flag(100, "stage-2 steps per val QA check (early stopping; 0: off)", BRIDGE)
    lr: float = flag(3e-3, "AdamW learning rate of the bridge stages (LM: --lm-lr)", BRIDGE)
    insert_layer: int = flag(-1, "layer l where image tokens enter (0 = plain LLaVA); -1: {0, N/4, "
                                 "N/2, 3N/4} + no-image control", EXPERIMENT)
    align_groups: int = flag(128, "groups of 8 scenes in the binding-controlled set", EXPERIMENT)
    knn_k: int = flag(10, "k of the mutual k-NN", EXPERIMENT)
    prefill_batch: int = flag(256, "prompts in the prefill timing batch", EXPERIMENT)
    out: str = out_flag("multimodal_align")


QUICK = dict(out=os.path.join("out", "multimodal_align_quick"), n_train=600, n_eval=100, vit_dim=32,
             vit_layers=2, vit_steps=60, d_model=32, n_layer=4, lm_steps=150, lm_scenes=2000,
             stage1_steps=20, stage2_steps=40, eval_every=20, align_groups=16, knn_k=5,
             prefill_batch=16)


def main(argv=None):
    """parse (--quick: QUICK) -> run: validate -> experiment -> report; bad input: exit 2."""
    cfg = parse_flags(Config, argv, "multimodal_align.py", __doc__, [("quick", True, QUICK)])
    return run_main("multimodal_align.py", run, cfg)


def run(cfg):
    """validate -> the experiment -> report (results.json after every bridge and at the end)."""
    seeds, layers = validate(cfg)
    start = time.perf_counter()
    world, vocab = shapes_world(cfg)                          # a bad --data-dir stops here, too
    keep_previous(cfg.out, also=lambda f: f.endswith(".png"))  # and the figures: none is replaced
    res = experiment(cfg, seeds, layers, world, vocab, pick_device(cfg.device),
                     metrics=os.path.join(cfg.out, "metrics.jsonl"))
    res["wall_s"] = time.perf_counter() - start
    write_results(cfg.out, res)
    report(cfg, res, layers, world)
    return res


def validate(cfg):
    """Every user error, before any training -> (seeds, layers)."""
    check_numbers(cfg, tuple("n_train n_eval patch vit_dim vit_layers image_tokens tokens_per_cell "
                             "d_model n_layer n_head lm_mix lm_scenes batch_size knn_k "
                             "align_groups prefill_batch image_size lr lm_lr".split()),
                  ("vit_steps", "lm_steps", "stage1_steps", "stage2_steps", "eval_every"))
    if not -1 <= cfg.insert_layer < cfg.n_layer:
        raise BadInput(f"--insert-layer must be in [0, {cfg.n_layer}) (or -1 for the sweep), "
                       f"got {cfg.insert_layer}")
    seeds = validate_image_and_run(cfg, vision.VisionConfig.batch_size)  # widths, sizes, data ...
    N, l = cfg.n_layer, cfg.insert_layer
    return seeds, [l] if l >= 0 else sorted({0, N // 4, N // 2, 3 * N // 4}) + [None]


def record(cfg, res, r, model, vocab, metrics):
    """One bridge's results: metrics.jsonl, its checkpoint, results.json (rewritten after each)."""
    l = "none" if r["insert_layer"] is None else r["insert_layer"]
    log_metrics(metrics, run=f"seed {r['seed']} l={l}", step=cfg.stage2_steps, split="test",
                qa=r["overall"], binding=r["binding_score"], per_type=r["per_type"],
                holdout=r["holdout"], train_s=r["train_s"], zero_retrain=r.get("zero_retrain"))
    res["runs"].append(r)
    save_bridge(cfg, f"l{l}_seed{r['seed']}", model, vocab)
    write_results(cfg.out, res)


def report(cfg, res, layers, world):
    """Alignment heat maps; QA, binding and cost per l against the baselines; zero-retrain; PNGs."""
    a, N = res["alignment"], cfg.n_layer
    rows, cols = ["in"] + [f"v{i + 1}" for i in range(cfg.vit_layers)], ["e"] + [
        str(j + 1) for j in range(N)]
    print()
    for name in ("trained", "shuffled_null", "random_lm"):
        print(heatmap(np.array(a[f"knn_{name}"]), rows, cols, "mutual k-NN on the binding-"
                      f"controlled set, ViT layer (rows) x LM layer (cols, e = embedding): {name} "
                      f"(chance {a['chance_knn']:.3f}, n {a['n']})"))
    print(f"alignment rises with LM depth: {'yes' if a['rises_with_lm_depth'] else 'no'}")
    types = [t for t in QUESTION_TYPES if any(t in r["per_type"] for r in res["runs"])]
    head = (f"{'l':>19s} " + " ".join(f"{k:>14s}" for k in ["overall", "binding"] + types)
            + f" {'hold-out':>13s} {'FLOPs saved form./count.':>24s} {'prefill ms':>10s}")
    print("\n" + head + "\n" + "-" * len(head))
    ref = oracle_reference(res["baselines"]["bag_oracle"])
    for l in layers:
        rs, cells = [r for r in res["runs"] if r["insert_layer"] == l], []
        for k in ["overall", "binding_score"] + types:   # mean ± std over seeds, * <= the oracle
            xs = [x for x in (r.get(k, r["per_type"].get(k)) for r in rs) if x is not None]
            below = xs and k in ref and mean_sd(xs)[0] <= ref[k]
            cells.append(mean_std(xs) + ("*" if below else " "))
        c = res["cost"].get(str(l))
        cost = (f"{c['flops_saved_formula'] * 100:10.1f}% / {c['flops_saved_counted'] * 100:5.1f}%"
                f"  {c['prefill_ms']:10.2f}" if c else f"{'-':>24s} {'-':>10s}")
        print(f"{'no image' if l is None else l:>19} " + " ".join(f"{x:>14s}" for x in cells)
              + f" {mean_std([r['holdout'] for r in rs]):>13s} {cost}")
    for name, label in BASELINES.items():
        if (b := res["baselines"][name]) is not None:
            vals = [b["overall"], binding_score(b)] + [b.get(t, float("nan")) for t in types]
            print(f"{label:>19s} " + " ".join(f"{v:13.3f} " for v in vals))
    if ref:
        print("* at or below the bag-of-words oracle: the caption's words alone, without binding, "
              "score that much")
    if zr := [r["zero_retrain"] for r in res["runs"] if "zero_retrain" in r]:
        print("zero-retrain (l=0 model, insertion moved to l', no finetune): "
              + "  ".join(f"l'={lp}: {np.mean([z[lp] for z in zr]):.3f}" for lp in range(N)))
    print_outputs(figures(cfg, res, layers, world), cfg.out, res["wall_s"])


def figures(cfg, res, layers, world):
    """With matplotlib (else none): scenes, alignment maps, QA vs compute PNGs -> their paths."""
    if (plt := pyplot()) is None:
        return []
    paths = [scene_grid(world["test"], os.path.join(cfg.out, "scenes.png"),
                        title="test scenes (shapes world v2)")]
    a, names = res["alignment"], ("trained", "shuffled_null", "random_lm")
    rows, cols = ["in"] + [f"v{i + 1}" for i in range(cfg.vit_layers)], ["e"] + [
        str(j + 1) for j in range(cfg.n_layer)]
    panels = [(a[f"knn_{n}"], rows, cols, dict(title=n, xlabel="LM layer (e = embedding)",
                                               ylabel="ViT layer" if n == names[0] else ""))
              for n in names]
    paths += [heatmap_grid(plt, panels, os.path.join(cfg.out, "alignment.png"), size=(4, 3.4),
                           values=".2f", title=f"mutual k-NN, binding-controlled set (n {a['n']}, "
                                                f"chance {a['chance_knn']:.3f})"),
              compute_figure(plt, res, layers, cfg)]
    return [p for p in paths if p]


def compute_figure(plt, res, layers, cfg):
    """QA (mean ± sample std over seeds) against prefill FLOPs (the formula) relative to l = 0."""
    c0, N, runs = res["cost"]["0"], cfg.n_layer, res["runs"]
    rel = [prefill_flops(c0["T"], c0["M"], N, l, cfg.d_model, 4 * cfg.d_model) / c0["flops_formula"]
           for l in range(N)]
    fig, ax = plt.subplots(figsize=(6, 4))
    sweep, note = [l for l in layers if l is not None], dict(textcoords="offset points", fontsize=7)
    for key, label in (("overall", "QA, all types"), ("binding_score", "binding score")):
        ms = [mean_sd([r[key] for r in runs if r["insert_layer"] == l]) for l in sweep]
        ax.errorbar([rel[l] for l in sweep], [m for m, _ in ms], yerr=[sd or 0 for _, sd in ms],
                    marker="o", capsize=3, label=f"{label} (finetuned at l)")
        for l, (m, _) in zip(sweep, ms):
            ax.annotate(f"l={l}", (rel[l], m), xytext=(4, 4), **note)
    if zr := [r["zero_retrain"] for r in runs if "zero_retrain" in r]:
        ax.plot(rel, [np.mean([z[lp] for z in zr]) for lp in range(N)], "k--", marker=".",
                label="QA, l=0 model moved to l' (no finetune)")
    none = [r["overall"] for r in runs if r["insert_layer"] is None]
    for label, y, colour in [("no-image control, QA", mean_sd(none)[0] if none else None, "r")] + [
            (f"{label}, QA", (res["baselines"][n] or {}).get("overall"), "gray")
            for n, label in BASELINES.items()]:
        if y is not None:
            ax.axhline(y, color=colour, ls=":", lw=1)
            ax.annotate(label, (max(rel), y), xytext=(0, 2), color=colour, ha="right", **note)
    ax.set(xlabel="prefill FLOPs relative to l = 0 (formula)", ylabel="test accuracy",
           title="DeepInsert: quality against prefill compute")
    ax.legend(fontsize=7)
    return save_png(plt, fig, os.path.join(cfg.out, "qa_vs_compute.png"))


if __name__ == "__main__":
    main()

"""Semantically grounded Q-Former vs the BLIP-2 two-stage Q-Former, on a laptop.

Paper: Choraria et al., "Semantically (v1: Language) Grounded QFormer for Efficient Vision Language
Understanding", arXiv 2311.07449; restated in ../shared/papers/qformer_efficient.md. Baseline: BLIP-2 (Li et
al. 2023, arXiv 2301.12597) and InstructBLIP (Dai et al. 2023, arXiv 2305.06500).
*** The paper has no public code and we only have its abstract: the method P below is a RECONSTRUCTION
from summaries, not the authors' implementation. ***

The whole argument in one file:
  1. frozen backbones pretrained here and cached: a small ViT (CLIP-style; its second-to-last layer feeds
     the Q-Former through a trainable LayerNorm, as in BLIP-2) and a small T5-style encoder-decoder LM
     trained on text alone (span corruption, "context: <caption> question: <q>" -> answer, captions);
  2. a BERT-like Q-Former: N_q learnable queries and text share self-attention, separate FFNs for query and
     text positions, cross-attention to the image every other layer (queries only);
  3. the variants, all on one data stream and seed, training only the Q-Former and its projections:
       B1   BLIP-2 two-stage. Stage 1: ITC + ITM + ITG on captions (three attention masks, below).
            Stage 2: query outputs -> linear -> soft prefix of the LM *encoder input*; LM loss.
       B2   no stage 1: the same stage 2 from the (MLM-pretrained) Q-Former.
            (B1 and B2 are both instruction-aware in stage 2, as InstructBLIP: the prompt's words sit next
            to the queries in the Q-Former. So B1 - B2 measures stage 1 and nothing else.)
       P    grounded Q-Former (reconstruction): h_p = LM_encoder(prompt) once per prompt, frozen, no grad;
            z = QFormer([queries ; W_in h_p], image); decoder memory = [W_out z ; h_p]; one LM loss.
            The LM encoder never sees a visual token and nothing backpropagates through it.
       P-a  ablation: decoder-side injection only (the Q-Former does not see the prompt).
       P-b  ablation: P's prompt-conditioned Q-Former, but fed through the LM encoder as B2 is.
       C0   control: P with the image blanked (the language-prior floor).
  4. captioning (BLEU-4, CIDEr-style) and VQA (exact match per question type and on a compositional
     hold-out), ITC retrieval R@1 after stage 1, quality against samples seen and wall clock, ms/step,
     training memory, and the samples / compute each variant needs to reach a target score.

    python qformer_efficient.py                                   # B1, B2, P; one seed (~15 min CPU)
    python qformer_efficient.py --variants B1,B2,P,P-a,P-b,C0 --seeds 0,1,2

Attention masks of the Q-Former in stage 1 ("may attend", rows attend to columns; Q queries, T text):
    ITC  unimodal     Q->Q, T->T           queries and text never see each other
    ITM  bidirectional Q<->T, all          a 2-way match head on every query output, averaged
    ITG  multimodal causal: Q->Q; T->Q and T->earlier T; the image reaches the text only via the queries

Shape legend:
    B = batch   Q = queries (N_q)   T = text tokens   P = image patches   C = ViT width
    D = Q-Former width   E = LM width   L = a sequence (queries + text, or the LM's memory)   V = vocabulary
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.common import (BadInput, RMSNorm, autocast, batches, best_of_rounds_ms, cli, encode, hash_str, pad,
                         pick_device, train_loop, validate_image_and_run)
from data.shapes_v1 import ViT, load_world, pretrain_clip, vit_tokens
from data.shapes_v1 import caption as shapes_caption

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------

VARIANTS = ("B1", "B2", "P", "P-a", "P-b", "C0")


@dataclass
class Config:
    # data (the shapes world of data/shapes.py, or --data-dir)
    n_train: int = 6000
    n_eval: int = 500
    image_size: int = 32
    data_dir: str = ""
    # frozen ViT (CLIP-style, pretrained here)
    patch: int = 4
    vit_dim: int = 64
    vit_layers: int = 4
    image_tokens: int = 64      # the full 8x8 patch grid of the second-to-last ViT layer
    clip_steps: int = 300
    # frozen T5-style LM (pretrained here, text only)
    d_model: int = 128
    enc_layers: int = 3
    dec_layers: int = 3
    n_head: int = 4
    max_len: int = 48
    lm_steps: int = 900
    # Q-Former
    queries: int = 8
    q_dim: int = 128
    q_layers: int = 4
    qformer_init: str = "mlm"
    mlm_steps: int = 200
    # the experiment
    variants: str = "B1,B2,P"
    stage1_steps: int = 200
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    caption_frac: float = 0.25
    eval_every: int = 50
    target_em: float = -1.0
    seeds: str = "0"
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    threads: int = 1
    out: str = os.path.join("out", "qformer_efficient")


HELP = dict(
    n_train="training scenes (procedural world)", n_eval="scenes in each of val/test/hold-out",
    image_size="image side in pixels", data_dir="real data: DIR/images.npy + DIR/annotations.jsonl (see data/shapes.py)",
    patch="ViT patch size", vit_dim="ViT width C", vit_layers="ViT blocks",
    image_tokens="image features P given to the Q-Former (a square number; the patch grid is average-pooled)",
    clip_steps="CLIP pretraining steps of the ViT", d_model="LM width E", enc_layers="LM encoder blocks",
    dec_layers="LM decoder blocks", n_head="attention heads (all models)", max_len="longest text in tokens",
    lm_steps="text-only LM pretraining steps", queries="learnable queries N_q", q_dim="Q-Former width D",
    q_layers="Q-Former blocks (cross-attention in every other one)",
    qformer_init="mlm (a small BERT-style text encoder pretrained here) | random",
    mlm_steps="masked-LM pretraining steps for --qformer-init mlm",
    variants=f"comma-separated, from {', '.join(VARIANTS)}", stage1_steps="B1's stage 1 steps (ITC + ITM + ITG)",
    steps="stage 2 steps of every variant", batch_size="batch size (every stage)", lr="AdamW learning rate",
    caption_frac="fraction of stage 2 items that are captions (the rest are questions)",
    eval_every="stage 2 steps between validation VQA evaluations (the learning curve)",
    target_em="the VQA target for 'samples to target'; -1 = B2's final validation score",
    seeds="comma-separated seeds of the Q-Former runs (the frozen backbones always use seed 0)",
    device="auto | cpu | cuda | mps", dtype="float32 | bfloat16 (autocast, opt-in)",
    compile="torch.compile the Q-Former and LM blocks (opt-in)",
    threads="CPU threads (1 is as fast as 2 for these small models and does not collapse when the cores are shared)",
    out="output folder: results.json, caches, checkpoints",
)

EXTRA_TOKENS = ["<cls>", "<dec>", "<mask>"] + [f"<x{i}>" for i in range(4)]   # BERT/BLIP-2 specials, T5 sentinels
CURVE_QUESTIONS = 1000      # validation questions per learning-curve point
N_REFS = 5                  # reference captions per test image (procedural data: re-captioned from the objects)


def load_data(cfg):
    """-> world (split -> dataset dict), vocab with the extra tokens, and reference captions per eval split."""
    world, vocab = load_world(cfg)
    for w in EXTRA_TOKENS:
        vocab.setdefault(w, len(vocab))
    refs = {}
    for s in ("val", "test", "holdout"):
        ds = world[s]
        if "objects" in ds:   # the procedural world: more references, with other synonyms and object orders
            rng = np.random.default_rng(7)
            refs[s] = [[c] + [shapes_caption(o, rng) for _ in range(N_REFS - 1)]
                       for c, o in zip(ds["captions"], ds["objects"])]
        else:
            refs[s] = [[c] for c in ds["captions"]]
    return world, vocab, refs


def qa_prompt(q):
    return f"question: {q}"


CAPTION_PROMPT = "caption:"


# ----------------------------------------------------------------------------------------------------
# Transformer pieces (pre-norm, RMSNorm; learned absolute positions where T5 would use relative biases)
# ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention; kv_BMC (cross-attention) may have another width than x."""

    def __init__(self, dim, n_head, kv_dim=None):
        super().__init__()
        self.nh = n_head
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BLD, kv_BMC=None, mask=None, causal=False):
        """mask: boolean 'may attend', broadcastable to (B, h, L, M)."""
        B, L, D = x_BLD.shape
        kv = x_BLD if kv_BMC is None else kv_BMC
        q = self.q(x_BLD).view(B, L, self.nh, -1).transpose(1, 2)
        k, v = self.kv(kv).view(B, kv.shape[1], 2, self.nh, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class FFN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln, self.fc1, self.fc2 = RMSNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class LMLayer(nn.Module):
    """T5 encoder layer (self-attention, FFN) or decoder layer (causal self-attention, cross-attention, FFN)."""

    def __init__(self, dim, n_head, decoder):
        super().__init__()
        self.ln1, self.attn, self.ffn = RMSNorm(dim), Attention(dim, n_head), FFN(dim)
        self.decoder = decoder
        if decoder:
            self.ln2, self.cross = RMSNorm(dim), Attention(dim, n_head)

    def forward(self, x, mask=None, mem=None, mem_mask=None):
        x = x + self.attn(self.ln1(x), mask=mask, causal=self.decoder)
        if self.decoder:
            x = x + self.cross(self.ln2(x), mem, mask=mem_mask)
        return self.ffn(x)


class T5LM(nn.Module):
    """A small T5-style encoder-decoder with a tied output head. Frozen after text-only pretraining."""

    def __init__(self, V, cfg):
        super().__init__()
        E = cfg.d_model
        self.emb = nn.Embedding(V, E)
        self.pos_enc = nn.Parameter(torch.randn(cfg.max_len + cfg.queries, E) * 0.02)
        self.pos_dec = nn.Parameter(torch.randn(cfg.max_len, E) * 0.02)
        self.enc = nn.ModuleList(LMLayer(E, cfg.n_head, False) for _ in range(cfg.enc_layers))
        self.dec = nn.ModuleList(LMLayer(E, cfg.n_head, True) for _ in range(cfg.dec_layers))
        self.norm_enc, self.norm_dec = RMSNorm(E), RMSNorm(E)

    def encode(self, x_BLE, keep_BL):
        """Encoder over input embeddings (so a soft prefix can be prepended) -> memory (B, L, E)."""
        h = x_BLE + self.pos_enc[: x_BLE.shape[1]]
        mask = keep_BL[:, None, None, :]                                  # padding is never attended
        for layer in self.enc:
            h = layer(h, mask=mask)
        return self.norm_enc(h)

    def encode_ids(self, ids_BT, pad_id):
        return self.encode(self.emb(ids_BT), ids_BT != pad_id)

    def decode(self, mem_BLE, mem_keep_BL, y_BT):
        """Teacher-forced decoder: y_BT starts with <bos>; -> logits (B, T, V) for the next tokens."""
        h = self.emb(y_BT) + self.pos_dec[: y_BT.shape[1]]
        mem_mask = mem_keep_BL[:, None, None, :]
        for layer in self.dec:
            h = layer(h, mem=mem_BLE, mem_mask=mem_mask)
        return self.norm_dec(h) @ self.emb.weight.T * self.emb.weight.shape[1] ** -0.5   # T5: tied head, scaled

    @torch.no_grad()
    def generate(self, mem_BLE, mem_keep_BL, bos, eos, max_new):
        """Greedy decoding (re-running the short decoder each step; no KV cache at this size) -> (B, <=max_new)."""
        y = torch.full((mem_BLE.shape[0], 1), bos, device=mem_BLE.device)
        done = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        for _ in range(max_new):
            nxt = self.decode(mem_BLE, mem_keep_BL, y)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            y = torch.cat([y, nxt[:, None]], 1)
            done |= nxt == eos
            if done.all():
                break
        return y[:, 1:]


# ----------------------------------------------------------------------------------------------------
# The Q-Former and its three stage-1 masks
# ----------------------------------------------------------------------------------------------------

def qformer_mask(n_q, keep_BT, kind):
    """Boolean 'may attend' mask (B, 1, Q+T, Q+T) over [queries ; text]; padded text is never attended.
        uni     (ITC): Q->Q, T->T only
        bi      (ITM, instruction-aware stage 2, P): everything
        causal  (ITG): Q->Q; T->Q; T->T for earlier-or-same positions"""
    B, T = keep_BT.shape
    L = n_q + T
    dev = keep_BT.device
    is_q = torch.arange(L, device=dev) < n_q
    if kind == "bi":
        m = torch.ones(L, L, dtype=torch.bool, device=dev)
    elif kind == "uni":
        m = is_q[:, None] == is_q[None, :]
    elif kind == "causal":
        m = torch.tril(torch.ones(L, L, dtype=torch.bool, device=dev)) | is_q[None, :]
        m &= ~(is_q[:, None] & ~is_q[None, :])                             # queries never see text
    else:
        raise ValueError(f"mask kind: expected uni, bi or causal, got {kind!r}")
    key_ok = torch.cat([torch.ones(B, n_q, dtype=torch.bool, device=dev), keep_BT], 1)
    return (m[None] & key_ok[:, None, :])[:, None]


class QFormerLayer(nn.Module):
    """Shared self-attention over queries and text; cross-attention to the image for the query positions only
    (when `cross`); separate FFNs for query and text positions (as LAVIS)."""

    def __init__(self, dim, n_head, cross, img_dim):
        super().__init__()
        self.ln1, self.attn = RMSNorm(dim), Attention(dim, n_head)
        self.cross = Attention(dim, n_head, kv_dim=img_dim) if cross else None
        self.ln_c = RMSNorm(dim) if cross else None
        self.ffn_q, self.ffn_t = FFN(dim), FFN(dim)

    def forward(self, x_BLD, n_q, mask, img_BPC):
        x = x_BLD + self.attn(self.ln1(x_BLD), mask=mask)
        q, t = x[:, :n_q], x[:, n_q:]
        if self.cross is not None and n_q and img_BPC is not None:
            q = q + self.cross(self.ln_c(q), img_BPC)
        return torch.cat([self.ffn_q(q), self.ffn_t(t)], 1)


class QFormer(nn.Module):
    def __init__(self, V, cfg):
        super().__init__()
        D = cfg.q_dim
        self.queries = nn.Parameter(torch.randn(cfg.queries, D) * 0.02)
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, D) * 0.02)
        self.img_norm = nn.LayerNorm(cfg.vit_dim)            # BLIP-2: trainable LayerNorm on the frozen features
        self.layers = nn.ModuleList(QFormerLayer(D, cfg.n_head, i % 2 == 0, cfg.vit_dim) for i in range(cfg.q_layers))
        self.norm = RMSNorm(D)

    def embed_text(self, ids_BT):
        return self.emb(ids_BT) + self.pos[: ids_BT.shape[1]]

    def forward(self, img_BPC, text_BTD, keep_BT, kind, use_queries=True):
        """-> (query outputs (B, Q, D), text outputs (B, T, D)). text_BTD may be empty (T = 0)."""
        B = text_BTD.shape[0]
        n_q = self.queries.shape[0] if use_queries else 0
        x = torch.cat([self.queries.expand(B, -1, -1)[:, :n_q], text_BTD], 1)
        mask = qformer_mask(n_q, keep_BT, kind)
        img = self.img_norm(img_BPC) if img_BPC is not None else None
        for layer in self.layers:
            x = layer(x, n_q, mask, img)
        x = self.norm(x)
        return x[:, :n_q], x[:, n_q:]

    def text_logits(self, t_BTD):
        return t_BTD @ self.emb.weight.T * self.emb.weight.shape[1] ** -0.5   # tied head (MLM pretraining, ITG)


# ----------------------------------------------------------------------------------------------------
# Stage 1 (B1 only): ITC + ITM + ITG
# ----------------------------------------------------------------------------------------------------

class Stage1Heads(nn.Module):
    def __init__(self, D, dim=64):
        super().__init__()
        self.img_proj, self.txt_proj = nn.Linear(D, dim), nn.Linear(D, dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.itm = nn.Linear(D, 2)


def itc_similarity(heads, z_BQD, cls_BD):
    """s(i, j) = max_k cos(z_ik, t_j): the best-matching query decides. -> (B_img, B_txt)."""
    zi = F.normalize(heads.img_proj(z_BQD), dim=-1)
    zt = F.normalize(heads.txt_proj(cls_BD), dim=-1)
    return torch.einsum("iqd,jd->ijq", zi, zt).amax(-1)


def hard_negatives(sim_BB, same_BB, gen):
    """For each row, one column sampled with p ∝ softmax(sim) over the columns that are NOT positives
    (same_BB: the diagonal, and any pair with an identical caption). A row with no negative falls back to
    any other index. -> (B,) column indices."""
    w = sim_BB.detach().float().softmax(-1).masked_fill(same_BB, 0.0)
    empty = w.sum(-1) <= 0
    if empty.any():
        w[empty] = (~torch.eye(len(w), dtype=torch.bool, device=w.device))[empty].float()
    return torch.multinomial(w, 1, generator=gen).squeeze(1)


def stage1_loss(qf, heads, img_BPC, cap_ids_BT, pad_id, vocab, gen):
    """L = ITC + ITM + ITG on one batch of (image features, caption ids without specials)."""
    B = len(cap_ids_BT)
    dev = img_BPC.device
    same = (cap_ids_BT[:, None, :] == cap_ids_BT[None, :, :]).all(-1)             # identical captions
    # ITC: unimodal mask; [CLS] + caption
    cls_ids = torch.cat([torch.full((B, 1), vocab["<cls>"], device=dev), cap_ids_BT], 1)
    keep = cls_ids != pad_id
    z, t = qf(img_BPC, qf.embed_text(cls_ids), keep, "uni")
    sim = itc_similarity(heads, z, t[:, 0])
    temp = heads.temp.clamp(0.001, 0.5)
    # targets: label smoothing 0.1 over the batch; a duplicate caption shares the positive mass (not a negative)
    tgt = 0.9 * same.float() / same.float().sum(1, keepdim=True) + 0.1 / B
    itc = (F.cross_entropy(sim / temp, tgt) + F.cross_entropy(sim.T / temp, tgt)) / 2
    # ITM: bidirectional mask; positives + one hard negative image per text and one hard negative text per image
    neg_img = hard_negatives(sim.T, same, gen)                                       # for text j: an image
    neg_txt = hard_negatives(sim, same, gen)                                         # for image i: a text
    imgs = torch.cat([img_BPC, img_BPC[neg_img], img_BPC])
    txts = torch.cat([cls_ids, cls_ids, cls_ids[neg_txt]])
    zq, _ = qf(imgs, qf.embed_text(txts), txts != pad_id, "bi")
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(dev)
    itm = F.cross_entropy(heads.itm(zq).mean(1), labels)                             # 2-way head, averaged over queries
    # ITG: multimodal causal mask; [DEC] caption <eos>, next-token loss on the text
    eos = torch.full((B, 1), pad_id, device=dev)
    dec_ids = torch.cat([torch.full((B, 1), vocab["<dec>"], device=dev), cap_ids_BT, eos], 1)
    lengths = (cap_ids_BT != pad_id).sum(1)
    dec_ids[torch.arange(B, device=dev), lengths + 1] = vocab["<eos>"]
    _, tg = qf(img_BPC, qf.embed_text(dec_ids[:, :-1]), dec_ids[:, :-1] != pad_id, "causal")
    itg = F.cross_entropy(qf.text_logits(tg).flatten(0, 1).float(), dec_ids[:, 1:].flatten(), ignore_index=pad_id,
                          label_smoothing=0.1)
    return itc + itm + itg, dict(itc=itc.item(), itm=itm.item(), itg=itg.item())


@torch.no_grad()
def itc_recall_at_1(qf, heads, feats, captions, vocab, device, max_len, chunk=100):
    """Image -> text R@1 within chunks of 100 validation pairs (an identical caption counts as a hit)."""
    hits = n = 0
    for i in range(0, len(captions) - chunk + 1, chunk):
        caps = captions[i:i + chunk]
        ids = pad([[vocab["<cls>"]] + encode(vocab, c, bos=False)[: max_len - 2] for c in caps], vocab["<pad>"]).to(device)
        z, t = qf(feats[i:i + chunk].to(device), qf.embed_text(ids), ids != vocab["<pad>"], "uni")
        pred = itc_similarity(heads, z, t[:, 0]).argmax(1).tolist()
        hits += sum(caps[p] == caps[j] for j, p in enumerate(pred))
        n += len(caps)
    return hits / max(n, 1)


# ----------------------------------------------------------------------------------------------------
# Stage 2: the variants around one frozen LM
# ----------------------------------------------------------------------------------------------------

class PromptCache:
    """h_p = LM_encoder(prompt), computed once per distinct prompt under no_grad (P, P-a, P-b, C0)."""

    def __init__(self, lm, vocab, device, max_len):
        self.lm, self.vocab, self.device, self.max_len, self.store, self.computed = lm, vocab, device, max_len, {}, 0

    def __call__(self, prompts):
        """-> (h_p (B, T, E), keep (B, T)) for a list of prompt strings."""
        new = sorted({p for p in prompts if p not in self.store})
        if new:
            ids = pad([encode(self.vocab, p, bos=False)[: self.max_len] for p in new], self.vocab["<pad>"]).to(self.device)
            with torch.no_grad():
                h = self.lm.encode_ids(ids, self.vocab["<pad>"]).float()
            for j, p in enumerate(new):
                self.store[p] = h[j, : int((ids[j] != self.vocab["<pad>"]).sum())]
            self.computed += len(new)
        hs = [self.store[p] for p in prompts]
        T = max(len(h) for h in hs)
        out = torch.zeros(len(hs), T, hs[0].shape[-1], device=self.device)
        keep = torch.zeros(len(hs), T, dtype=torch.bool, device=self.device)
        for j, h in enumerate(hs):
            out[j, : len(h)], keep[j, : len(h)] = h, True
        return out, keep


class Bridge(nn.Module):
    """Q-Former + projections around the frozen LM; `memory` builds the decoder memory of each variant."""

    def __init__(self, qformer, lm, variant, vocab, cfg, device):
        super().__init__()
        self.qf, self.variant, self.vocab, self.max_len = qformer, variant, vocab, cfg.max_len
        self.lm = [lm]                                       # a list: the frozen LM is not a submodule (no grads, no ckpt)
        self.out_proj = nn.Linear(cfg.q_dim, cfg.d_model)    # query outputs -> LM width
        self.in_proj = nn.Linear(cfg.d_model, cfg.q_dim)     # h_p -> Q-Former width (P, P-b, C0)
        self.cache = PromptCache(lm, vocab, device, cfg.max_len)

    def memory(self, img_BPC, prompts):
        """-> (decoder memory (B, L, E), keep (B, L))."""
        lm, v, pad_id = self.lm[0], self.variant, self.vocab["<pad>"]
        dev = img_BPC.device
        if v == "C0":
            img_BPC = torch.zeros_like(img_BPC)
        if v in ("B1", "B2", "P-b"):                         # the prefix goes through the LM encoder
            ids = pad([encode(self.vocab, p, bos=False)[: self.max_len] for p in prompts], pad_id).to(dev)
            keep = ids != pad_id
            if v == "P-b":
                h_p, kp = self.cache(prompts)
                z, _ = self.qf(img_BPC, self.in_proj(h_p), kp, "bi")
            else:                                            # instruction-aware: the prompt's words in the Q-Former
                z, _ = self.qf(img_BPC, self.qf.embed_text(ids), keep, "bi")
            prefix = self.out_proj(z)
            keep_all = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.bool, device=dev), keep], 1)
            return lm.encode(torch.cat([prefix, lm.emb(ids)], 1), keep_all), keep_all
        h_p, kp = self.cache(prompts)                        # P, P-a, C0: the LM encoder sees only the prompt
        if v == "P-a":
            z, _ = self.qf(img_BPC, h_p.new_zeros(len(prompts), 0, self.qf.queries.shape[1]),
                           kp[:, :0], "bi")
        else:
            z, _ = self.qf(img_BPC, self.in_proj(h_p), kp, "bi")
        mem = torch.cat([self.out_proj(z), h_p.to(z.dtype)], 1)
        return mem, torch.cat([torch.ones(z.shape[:2], dtype=torch.bool, device=dev), kp], 1)

    def loss(self, img_BPC, prompts, targets):
        mem, keep = self.memory(img_BPC, prompts)
        pad_id = self.vocab["<pad>"]
        y = pad([[self.vocab["<bos>"]] + encode(self.vocab, t, bos=False, eos=True)[: self.max_len - 1] for t in targets],
                pad_id).to(mem.device)
        logits = self.lm[0].decode(mem, keep, y[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=pad_id)

    @torch.no_grad()
    def generate(self, img_BPC, prompts, max_new):
        mem, keep = self.memory(img_BPC, prompts)
        out = self.lm[0].generate(mem, keep, self.vocab["<bos>"], self.vocab["<eos>"], max_new)
        inv = {i: w for w, i in self.vocab.items()}
        texts = []
        for row in out.tolist():
            words = [inv[t] for t in row]
            texts.append(" ".join(words[: words.index("<eos>")] if "<eos>" in words else words))
        return texts


# ----------------------------------------------------------------------------------------------------
# Metrics: BLEU-4, a CIDEr-style score, VQA exact match, training memory
# ----------------------------------------------------------------------------------------------------

def ngrams(words, n):
    out = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        out[g] = out.get(g, 0) + 1
    return out


def bleu4(hyps, refs):
    """Corpus BLEU-4 (Papineni et al. 2002): clipped n-gram precisions p_1..p_4 summed over the corpus,
    geometric mean, brevity penalty exp(1 - r/c) when c < r, r = the reference length closest to each
    hypothesis' (ties: the shorter). No smoothing: 0 when some p_n has no match."""
    match, total = [0] * 4, [0] * 4
    c = r = 0
    for h, rs in zip(hyps, refs):
        hw, rws = h.split(), [x.split() for x in rs]
        c += len(hw)
        r += min((abs(len(x) - len(hw)), len(x)) for x in rws)[1]
        for n in range(1, 5):
            hg = ngrams(hw, n)
            best = {}
            for x in rws:
                for g, k in ngrams(x, n).items():
                    best[g] = max(best.get(g, 0), k)
            match[n - 1] += sum(min(k, best.get(g, 0)) for g, k in hg.items())
            total[n - 1] += max(len(hw) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if c >= r else math.exp(1 - r / max(c, 1))
    return bp * math.exp(log_p)


def cider(hyps, refs):
    """CIDEr-style consensus (Vedantam et al. 2015, without CIDEr-D's length penalty and clipping):
    TF-IDF n-gram vectors (document frequency over the reference sets), cosine between the hypothesis and
    each reference, averaged over references and over n = 1..4, times 10."""
    N = len(refs)
    df = {}
    for rs in refs:
        for g in {g for x in rs for n in range(1, 5) for g in ngrams(x.split(), n)}:
            df[g] = df.get(g, 0) + 1

    def vec(words, n):
        v = ngrams(words, n)
        return {g: k * math.log(N / max(df.get(g, 0), 1)) for g, k in v.items()}

    def cos(a, b):
        na, nb = math.sqrt(sum(x * x for x in a.values())), math.sqrt(sum(x * x for x in b.values()))
        return sum(x * b.get(g, 0.0) for g, x in a.items()) / (na * nb) if na > 0 and nb > 0 else 0.0

    score = 0.0
    for h, rs in zip(hyps, refs):
        score += np.mean([np.mean([cos(vec(h.split(), n), vec(x.split(), n)) for x in rs]) for n in range(1, 5)])
    return 10 * score / max(N, 1)


def vqa_items(ds):
    return [(i, qa_prompt(d["q"]), d["a"], d.get("type", "other")) for i, qa in enumerate(ds["qa"]) for d in qa]


@torch.no_grad()
def vqa_em(model, feats, items, device, bs=256):
    """Greedy answer == the reference answer (whole string), overall and per question type."""
    hit = {}
    for i in range(0, len(items), bs):
        chunk = items[i:i + bs]
        pred = model.generate(feats[[j for j, *_ in chunk]].to(device), [p for _, p, _, _ in chunk], max_new=4)
        for (_, _, a, t), p in zip(chunk, pred):
            hit.setdefault(t, []).append(p == a)
    per_type = {t: float(np.mean(v)) for t, v in sorted(hit.items())}
    return float(np.mean([x for v in hit.values() for x in v])) if hit else 0.0, per_type


@torch.no_grad()
def caption_scores(model, feats, refs, device, cfg, bs=256):
    hyps = []
    for i in range(0, len(refs), bs):
        hyps += model.generate(feats[i:i + bs].to(device), [CAPTION_PROMPT] * len(feats[i:i + bs]), cfg.max_len - 2)
    return bleu4(hyps, refs), cider(hyps, refs), hyps


def step_memory_mib(step_fn, params, device):
    """Training memory of one step (MiB). CUDA: max allocated. CPU (no allocator statistics there): an
    estimate = every storage autograd saves for the backward pass (activations, and the weights the backward
    needs; each counted once, via saved_tensors_hooks) + 3x the trainable parameters (their gradients and
    two AdamW moments). Comparable between variants, not an RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_fn()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_fn()
    train = sum(p.numel() * p.element_size() for p in params)
    return (sum(seen.values()) + 3 * train) / 2 ** 20


# ----------------------------------------------------------------------------------------------------
# Pretraining the frozen backbones (text-only LM; BERT-style Q-Former init), cached in --out
# ----------------------------------------------------------------------------------------------------

def span_corrupt(words, rng):
    """T5 span corruption: 1-2 spans of 1-3 words -> sentinels. -> (input words, target words)."""
    n_spans = 1 + int(len(words) > 8)
    starts = sorted(rng.choice(max(len(words) - 3, 1), size=n_spans, replace=False))
    src, tgt, i = [], [], 0
    for k, s in enumerate(starts):
        if s < i:
            continue
        ln = int(rng.integers(1, 4))
        src += words[i:s] + [f"<x{k}>"]
        tgt += [f"<x{k}>"] + words[s:s + ln]
        i = s + ln
    return src + words[i:], tgt


def lm_example(ds, i, rng):
    """One text-only (source, target) pair from scene i: span corruption, QA with the caption as context,
    caption copy with context, or caption continuation."""
    c, qa = ds["captions"][i], ds["qa"][i]
    task = rng.choice(4, p=[0.2, 0.5, 0.15, 0.15])          # QA, the hardest, gets half of the steps
    if task == 0:
        src, tgt = span_corrupt(c.split(), rng)
        return " ".join(src), " ".join(tgt)
    if task == 1 and qa:
        d = qa[rng.integers(len(qa))]
        return f"context: {c} {qa_prompt(d['q'])}", d["a"]
    if task == 2:
        return f"context: {c} {CAPTION_PROMPT}", c
    w = c.split()
    k = int(rng.integers(0, len(w)))
    return " ".join([CAPTION_PROMPT] + w[:k]), " ".join(w[k:])


def pretrain_lm(world, vocab, cfg, device):
    lm = T5LM(len(vocab), cfg).to(device)
    tr, rng, pad_id = world["train"], np.random.default_rng(2), vocab["<pad>"]
    it = batches(len(tr["captions"]), cfg.batch_size, seed=2)

    def loss_fn(step):
        pairs = [lm_example(tr, int(i), rng) for i in next(it)]
        x = pad([encode(vocab, s, bos=False)[: cfg.max_len] for s, _ in pairs], pad_id).to(device)
        y = pad([[vocab["<bos>"]] + encode(vocab, t, bos=False, eos=True)[: cfg.max_len - 1] for _, t in pairs],
                pad_id).to(device)
        logits = lm.decode(lm.encode_ids(x, pad_id), x != pad_id, y[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=pad_id)

    train_loop(list(lm.parameters()), loss_fn, cfg.lm_steps, cfg, "T5 LM", device)
    return lm.eval()


@torch.no_grad()
def text_only_qa(lm, ds, vocab, cfg, device):
    """The frozen LM alone, GIVEN THE TRUE CAPTION ('context: <caption> question: <q>'), greedy, on every
    question: the ceiling for a perfect visual bridge. -> (exact match, per question type)."""
    items = [(f"context: {c} {qa_prompt(d['q'])}", d["a"], d.get("type", "other"))
             for c, qa in zip(ds["captions"], ds["qa"]) for d in qa]
    pad_id, hit = vocab["<pad>"], {}
    for i in range(0, len(items), 256):
        chunk = items[i:i + 256]
        x = pad([encode(vocab, s, bos=False)[: cfg.max_len] for s, _, _ in chunk], pad_id).to(device)
        out = lm.generate(lm.encode_ids(x, pad_id), x != pad_id, vocab["<bos>"], vocab["<eos>"], 2)
        for o, (_, a, t) in zip(out.tolist(), chunk):
            hit.setdefault(t, []).append(o[0] == vocab.get(a, -1) and o[1:2] == [vocab["<eos>"]])
    flat = [h for v in hit.values() for h in v]
    return sum(flat) / max(len(flat), 1), {t: float(np.mean(v)) for t, v in sorted(hit.items())}


def pretrain_mlm(world, vocab, cfg, device):
    """The Q-Former's BERT init: its text path (embeddings, self-attention, text FFN) trained with masked-LM
    (15% of words -> <mask>) on captions and questions; the query FFN starts as a copy of the text FFN."""
    torch.manual_seed(0)
    qf = QFormer(len(vocab), cfg).to(device)
    tr, pad_id = world["train"], vocab["<pad>"]
    texts = [c for c in tr["captions"]] + [d["q"] for qa in tr["qa"] for d in qa[:1]]
    ids = pad([encode(vocab, t, bos=False)[: cfg.max_len] for t in texts], pad_id)
    it = batches(len(ids), cfg.batch_size, seed=3)
    gen = torch.Generator().manual_seed(3)

    def loss_fn(step):
        x = ids[next(it)]
        pick = (torch.rand(x.shape, generator=gen) < 0.15) & (x != pad_id)
        x, pick = x.to(device), pick.to(device)
        _, t = qf(None, qf.embed_text(x.masked_fill(pick, vocab["<mask>"])), x != pad_id, "bi", use_queries=False)
        return F.cross_entropy(qf.text_logits(t)[pick].float(), x[pick])

    if cfg.mlm_steps:
        train_loop(list(qf.parameters()), loss_fn, cfg.mlm_steps, cfg, "Q-Former MLM", device)
    for layer in qf.layers:
        layer.ffn_q.load_state_dict(layer.ffn_t.state_dict())
    return qf


def backbones(world, vocab, cfg, device):
    """Pretrain (or load from the cache in --out) the frozen ViT, the frozen LM and the Q-Former init."""
    keys = ("n_train", "image_size", "data_dir", "patch", "vit_dim", "vit_layers", "clip_steps", "d_model",
            "enc_layers", "dec_layers", "n_head", "max_len", "queries", "lm_steps", "q_dim", "q_layers",
            "qformer_init", "mlm_steps", "batch_size", "lr", "dtype")
    tag = "_".join(str(getattr(cfg, k)) for k in keys) + f"_{len(vocab)}"
    path = os.path.join(cfg.out, f"backbones_{hash_str(tag):x}.pt")
    torch.manual_seed(0)
    vit, lm = None, T5LM(len(vocab), cfg).to(device)
    qf = QFormer(len(vocab), cfg).to(device)
    if os.path.exists(path):
        ck = torch.load(path, map_location=device, weights_only=True)
        vit = ViT(cfg).to(device)
        vit.load_state_dict(ck["vit"])
        lm.load_state_dict(ck["lm"])
        qf.load_state_dict(ck["qformer"])
        print(f"loaded cached backbones from {path}")
        qa, qa_types = text_only_qa(lm.eval(), world["val"], vocab, cfg, device)
        quality = dict(ck["quality"], lm_text_qa_em=qa, lm_text_qa_per_type=qa_types)
        return vit.eval(), lm.eval(), ck["qformer"], quality
    t = time.perf_counter()
    vit, r1 = pretrain_clip(world, vocab, cfg, device)
    lm = pretrain_lm(world, vocab, cfg, device)
    if cfg.qformer_init == "mlm":
        qf = pretrain_mlm(world, vocab, cfg, device)
    qa, qa_types = text_only_qa(lm, world["val"], vocab, cfg, device)
    quality = dict(vit_retrieval_r1=r1, lm_text_qa_em=qa, pretrain_s=time.perf_counter() - t)
    os.makedirs(cfg.out, exist_ok=True)
    torch.save(dict(vit=vit.state_dict(), lm=lm.state_dict(), qformer=qf.state_dict(), quality=quality), path + ".tmp")
    os.replace(path + ".tmp", path)
    return vit, lm, qf.state_dict(), dict(quality, lm_text_qa_per_type=qa_types)


# ----------------------------------------------------------------------------------------------------
# Training one variant on the shared data stream
# ----------------------------------------------------------------------------------------------------

def stage2_stream(ds, cfg, seed):
    """The one data stream all variants of a seed train on: per step, batch_size (scene, prompt, target);
    a caption with probability caption_frac, otherwise one of the scene's questions."""
    rng = np.random.default_rng([seed, 2])
    it = batches(len(ds["captions"]), cfg.batch_size, seed=seed * 10 + 2)
    out = []
    for _ in range(cfg.steps):
        items = []
        for i in next(it):
            qa = ds["qa"][i]
            if rng.random() < cfg.caption_frac or not qa:
                items.append((int(i), CAPTION_PROMPT, ds["captions"][i]))
            else:
                d = qa[rng.integers(len(qa))]
                items.append((int(i), qa_prompt(d["q"]), d["a"]))
        out.append(items)
    return out


def run_stage1(qf, feats, ds, vocab, cfg, seed, device):
    """B1's stage 1 -> (ITC head, stats). The Q-Former is trained in place."""
    heads = Stage1Heads(cfg.q_dim).to(device)
    pad_id = vocab["<pad>"]
    caps = [encode(vocab, c, bos=False)[: cfg.max_len - 2] for c in ds["captions"]]
    it = batches(len(caps), cfg.batch_size, seed=seed * 10 + 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    log = []

    def loss_fn(step):
        b = next(it)
        loss, parts = stage1_loss(qf, heads, feats[b].to(device), pad([caps[i] for i in b], pad_id).to(device),
                                  pad_id, vocab, gen)
        if step % 50 == 0:
            log.append(dict(step=step, **parts))
        return loss

    t = time.perf_counter()
    train_loop(list(qf.parameters()) + list(heads.parameters()), loss_fn, cfg.stage1_steps, cfg, "B1 stage 1", device)
    return heads, dict(stage1_s=time.perf_counter() - t, stage1_samples=cfg.stage1_steps * cfg.batch_size,
                       stage1_log=log)


def train_variant(variant, seed, lm, qf_state, feats, world, vocab, refs, stream, cfg, device):
    """Stage 1 (B1 only), then stage 2 on `stream`; -> (bridge, result dict with the learning curve)."""
    torch.manual_seed(seed)
    qf = QFormer(len(vocab), cfg).to(device)
    if cfg.qformer_init == "mlm":
        qf.load_state_dict(qf_state)
    res = dict(variant=variant, seed=seed, stage1_s=0.0, stage1_samples=0)
    if variant == "B1" and cfg.stage1_steps:
        heads, st = run_stage1(qf, feats["train"], world["train"], vocab, cfg, seed, device)
        res.update(st, itc_r1=itc_recall_at_1(qf, heads, feats["val"], world["val"]["captions"], vocab, device,
                                                    cfg.max_len))
        print(f"  B1 stage 1: {st['stage1_s']:.0f} s, ITC image->text R@1 {res['itc_r1']:.3f} (chunks of 100 val pairs)")
    model = Bridge(qf, lm, variant, vocab, cfg, device).to(device)
    if cfg.compile:
        for layer in qf.layers:
            layer.compile()
    params = list(model.parameters())                        # the LM is not a submodule: only the bridge trains
    val_items = vqa_items(world["val"])[:CURVE_QUESTIONS]
    tr = feats["train"]

    def loss_on(items):
        idx = [i for i, _, _ in items]
        return model.loss(tr[idx].to(device), [p for _, p, _ in items], [t for _, _, t in items])

    with autocast(cfg, device):
        res["mem_mib"] = step_memory_mib(lambda: loss_on(stream[0]).backward(), params, device)
    for p in params:
        p.grad = None
    curve, stamps, eval_s = [], [], [0.0]

    def evaluate(step):
        t = time.perf_counter()
        em = vqa_em(model, feats["val"], val_items, device)[0]
        eval_s[0] += time.perf_counter() - t
        train_s = time.perf_counter() - t0 - eval_s[0]
        curve.append(dict(step=step, samples=step * cfg.batch_size, train_s=train_s, val_em=em))

    def loss_fn(step):
        if step and step % cfg.eval_every == 0:
            evaluate(step)
        stamps.append((time.perf_counter(), eval_s[0]))
        return loss_on(stream[step])

    t0 = time.perf_counter()
    train_loop(params, loss_fn, cfg.steps, cfg, f"{variant} seed {seed}", device)
    evaluate(cfg.steps)
    gaps = [(b[0] - a[0]) - (b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]
    res.update(curve=curve, stage2_s=curve[-1]["train_s"], step_ms=float(np.median(gaps) * 1e3) if gaps else None,
               prompts_encoded=model.cache.computed, curve_eval_s=eval_s[0])
    return model, res


def interleaved_step_ms(models, stream, feats, cfg, device, rounds=15):
    """Forward + backward time (ms) of each variant on the same batches, the variants interleaved
    (data/common.py: a busy spell of the machine hits every variant alike; the best round counts)."""
    def step(m):
        def f(r):
            items = stream[r % len(stream)]
            with autocast(cfg, device):
                loss = m.loss(feats[[i for i, _, _ in items]].to(device), [p for _, p, _ in items],
                              [y for _, _, y in items])
            loss.backward()
            m.zero_grad(set_to_none=True)
        return f
    return best_of_rounds_ms({v: step(m) for v, m in models.items()}, device, rounds)


def final_eval(model, feats, world, refs, cfg, device):
    em, per_type = vqa_em(model, feats["test"], vqa_items(world["test"]), device)
    hold = vqa_em(model, feats["holdout"], vqa_items(world["holdout"]), device)[0] if len(world["holdout"]["captions"]) else None
    bleu, cid, hyps = caption_scores(model, feats["test"], refs["test"], device, cfg)
    return dict(vqa_em=em, vqa_per_type=per_type, holdout_em=hold, bleu4=bleu, cider=cid, examples=hyps[:3])


def to_target(r, target):
    """First learning-curve point at or above the target: samples and training seconds, stage 1 included."""
    for c in r["curve"]:
        if c["val_em"] >= target - 1e-9:
            return c["samples"] + r["stage1_samples"], c["train_s"] + r["stage1_s"]
    return None, None


def summarise(runs, cfg):
    """Per seed: targets from B2's (and B1's) final validation score; samples / compute to reach them."""
    out = {}
    for seed in sorted({r["seed"] for r in runs}):
        rs = {r["variant"]: r for r in runs if r["seed"] == seed}
        ref = rs.get("B2") or next(iter(rs.values()))
        target = cfg.target_em if cfg.target_em >= 0 else ref["curve"][-1]["val_em"]
        s = dict(target_em=target, target_from="--target-em" if cfg.target_em >= 0 else ref["variant"])
        for v, r in rs.items():
            r["samples_to_target"], r["seconds_to_target"] = to_target(r, target)
        if "P" in rs and "B2" in rs:
            p, b2 = rs["P"], rs["B2"]
            key = "fwd_bwd_ms" if "fwd_bwd_ms" in p and "fwd_bwd_ms" in b2 else "step_ms"
            s["P_step_over_B2_step"] = p[key] / b2[key] if p[key] and b2[key] else None   # None: a 1-step run
            s["step_ratio_from"] = key
            s["P_samples_over_B2_samples"] = (p["samples_to_target"] / b2["samples_to_target"]
                                              if p["samples_to_target"] and b2["samples_to_target"] else None)
        if "P" in rs and "B1" in rs:
            b1 = rs["B1"]
            sec = to_target(rs["P"], b1["curve"][-1]["val_em"])[1]
            s["B1_final_val_em"] = b1["curve"][-1]["val_em"]
            s["P_compute_to_B1_final_over_B1_total"] = sec / (b1["stage1_s"] + b1["stage2_s"]) if sec else None
        out[seed] = s
    return out


# ----------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------

def validate(cfg):
    for f in ("n_train", "n_eval", "patch", "vit_dim", "vit_layers", "image_tokens", "d_model", "enc_layers",
              "dec_layers", "n_head", "max_len", "q_dim", "q_layers", "batch_size", "eval_every", "threads"):
        if getattr(cfg, f) <= 0:
            raise BadInput(f"--{f.replace('_', '-')} must be positive, got {getattr(cfg, f)}")
    if cfg.queries < 1:
        raise BadInput(f"--queries must be at least 1, got {cfg.queries}")
    for f in ("clip_steps", "lm_steps", "mlm_steps", "stage1_steps", "steps"):
        if getattr(cfg, f) < 0:
            raise BadInput(f"--{f.replace('_', '-')} must be >= 0, got {getattr(cfg, f)}")
    if cfg.steps < 1:
        raise BadInput("--steps must be at least 1")
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise BadInput(f"--variants: unknown {', '.join(map(repr, bad)) or 'empty list'}; choose from {', '.join(VARIANTS)}")
    if cfg.qformer_init not in ("mlm", "random"):
        raise BadInput(f"--qformer-init: expected mlm or random, got {cfg.qformer_init!r}")
    if not 0 <= cfg.caption_frac <= 1:
        raise BadInput(f"--caption-frac must be in [0, 1], got {cfg.caption_frac}")
    for name, d in (("d-model", cfg.d_model), ("q-dim", cfg.q_dim), ("vit-dim", cfg.vit_dim)):
        if d % cfg.n_head:
            raise BadInput(f"--{name} {d} must be a multiple of --n-head {cfg.n_head}")
    return variants, validate_image_and_run(cfg)


def run(cfg):
    variants, seeds = validate(cfg)
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    world, vocab, refs = load_data(cfg)
    print(f"device {device}, vocab {len(vocab)}, train {len(world['train']['captions'])} scenes, "
          f"Q-Former {cfg.q_layers}x{cfg.q_dim} with {cfg.queries} queries, LM {cfg.enc_layers}+{cfg.dec_layers}x{cfg.d_model}, "
          f"variants {variants}, seeds {seeds}")
    vit, lm, qf_state, quality = backbones(world, vocab, cfg, device)
    for p in list(vit.parameters()) + list(lm.parameters()):
        p.requires_grad_(False)
    if cfg.compile:
        for layer in list(lm.enc) + list(lm.dec):
            layer.compile()
    print(f"frozen backbones: ViT image->caption R@1 {quality['vit_retrieval_r1']:.3f} (CLIP, chunks of 100), "
          f"LM text-only QA exact match {quality['lm_text_qa_em']:.3f} (the true caption given as context: "
          + ", ".join(f"{t} {a:.2f}" for t, a in quality["lm_text_qa_per_type"].items()) + ")")
    feats = {s: vit_tokens(vit, world[s]["images"], cfg, device) for s in world if len(world[s]["captions"])}
    os.makedirs(cfg.out, exist_ok=True)
    runs = []
    for seed in seeds:
        stream = stage2_stream(world["train"], cfg, seed)
        models = {}
        for v in variants:
            model, r = train_variant(v, seed, lm, qf_state, feats, world, vocab, refs, stream, cfg, device)
            models[v] = model
            r.update(final_eval(model, feats, world, refs, cfg, device))
            print(f"  {v} seed {seed}: VQA EM {r['vqa_em']:.3f}, hold-out {fmt(r['holdout_em'])}, BLEU-4 {r['bleu4']:.3f}, "
                  f"CIDEr {r['cider']:.2f}, {fmt(r['step_ms'], '.0f')} ms/step, {r['mem_mib']:.0f} MiB, "
                  f"stage 2 {r['stage2_s']:.0f} s; e.g. '{r['examples'][0]}'")
            runs.append(r)
            torch.save(model.state_dict(), os.path.join(cfg.out, f"bridge_{v}_seed{seed}.pt"))
            write_results(cfg, quality, runs, summarise(runs, cfg))
        for v, ms in interleaved_step_ms(models, stream, feats["train"], cfg, device).items():
            next(r for r in runs if r["seed"] == seed and r["variant"] == v)["fwd_bwd_ms"] = ms
    summary = summarise(runs, cfg)
    write_results(cfg, quality, runs, summary)
    report(runs, summary, variants, world)
    return runs, summary


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def write_results(cfg, quality, runs, summary):
    path = os.path.join(cfg.out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(config=asdict(cfg), backbones=quality, runs=runs, summary={str(k): v for k, v in summary.items()}),
                  f, indent=1)
    os.replace(path + ".tmp", path)


def mean_std(xs, spec=".3f"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return format(np.mean(xs), spec) + (f" ± {format(np.std(xs), spec)}" if len(xs) > 1 else "")


def report(runs, summary, variants, world):
    cols = ("variant", "BLEU-4", "CIDEr", "VQA EM", "hold-out EM", "ms/step", "fwd+bwd ms", "mem MiB", "samples to target")
    print()
    print(" | ".join(cols))
    print("-" * 110)
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        reached = [r["samples_to_target"] for r in rs if r["samples_to_target"] is not None]
        stt = (f"{np.mean(reached):.0f}" if reached else "not reached") + (f" ({len(reached)}/{len(rs)} seeds)" if len(rs) > 1 else "")
        print(" | ".join([v, mean_std([r["bleu4"] for r in rs]), mean_std([r["cider"] for r in rs], ".2f"),
                          mean_std([r["vqa_em"] for r in rs]), mean_std([r["holdout_em"] for r in rs]),
                          mean_std([r["step_ms"] for r in rs], ".0f"), mean_std([r.get("fwd_bwd_ms") for r in rs], ".0f"),
                          mean_std([r["mem_mib"] for r in rs], ".0f"), stt]))
    types = sorted({t for r in runs for t in r["vqa_per_type"]})
    print("VQA EM per type: " + "; ".join(
        f"{v}: " + ", ".join(f"{t} {np.mean([r['vqa_per_type'][t] for r in runs if r['variant'] == v]):.2f}" for t in types)
        for v in variants))
    for seed, s in summary.items():
        parts = [f"seed {seed}: target val EM {s['target_em']:.3f} (from {s['target_from']})"]
        if "P_step_over_B2_step" in s:
            parts.append(f"P step / B2 step {fmt(s['P_step_over_B2_step'], '.2f')} ({s['step_ratio_from']}; target <= 0.7)")
            parts.append(f"P samples / B2 samples to target {fmt(s['P_samples_over_B2_samples'], '.2f')} (target <= 0.5)")
        if "P_compute_to_B1_final_over_B1_total" in s:
            parts.append(f"P seconds to B1's final / B1's total {fmt(s['P_compute_to_B1_final_over_B1_total'], '.2f')} "
                         f"(target <= 0.33)")
        print("; ".join(parts))
    r1 = [r["itc_r1"] for r in runs if "itc_r1" in r]
    if r1:
        print(f"B1 stage 1 ITC image->text R@1: {mean_std(r1)}")


def main(argv=None):
    return cli(argv, Config, HELP, __doc__, run, "qformer_efficient.py")


if __name__ == "__main__":
    main()

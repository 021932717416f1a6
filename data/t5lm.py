"""The frozen language model of qformer_efficient.py: a small T5-style encoder-decoder pretrained
once on text alone and cached, the stand-in for the FlanT5 a user would download. It must bind from
text before any bridge can: given the true caption as context it answers every question type (the
text ceiling; gate >= 0.95 per type).

Text formats (what the bridge's prompts must match):
    "context: <caption> question: <q>"  -> "<answer>"     every question of a scene
    "context: <caption> caption:"       -> "<caption>"    the caption again (stage 2's captions)
The Q-Former takes the place of "context: <caption>": as a soft prefix of the encoder input
(BLIP-2), or next to the encoded prompt in the decoder's memory (the grounded Q-Former).

Why this shape (docs/qformer_efficient.md, "Where we differ"): the encoder's blocks are
data/layers.Block, bidirectional, with RoPE and Primer's *causal* depthwise conv on q, k, v (kernel
3). A key then also carries the two words before it, so "the shape word just before <cell>" is one
attention hop. Without the conv the shape-at-cell and position lookups stay near 0.5; with a centred
conv, position stalls near 0.8 (a key mixes both neighbours, and the next object's words leak in).
The conv's taps on the two predecessors start random (std cfg.lm_mix_init), not at the identity:
from the identity, "the shape word before <cell>" sat on a plateau near 0.5 for most of pretraining
and left it late or never, depending on the CPU thread count; with random taps every key and value
carries its neighbours from step 0. The decoder: causal self-attention, cross-attention to the
memory, FFN; tied output head, scaled as T5's.

Shapes: B = batch, T = target tokens, L = memory (encoder) length, E = width, V = vocabulary.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.layers import FFN, Attention, Block, RMSNorm, batches, encode, pad, train_loop
from data.multimodal import cached_lm
from data.shapes import generate

CAPTION_PROMPT = "caption:"


def qa_prompt(q):
    return f"question: {q}"


class DecoderLayer(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.ln1, self.self_attn = RMSNorm(dim), Attention(dim, n_head)
        self.ln2, self.cross = RMSNorm(dim), Attention(dim, n_head)
        self.ffn = FFN(dim)

    def forward(self, y_BTE, mem_BLE, mem_mask, pos_T):
        y = y_BTE + self.self_attn(self.ln1(y_BTE), causal=True, pos_L=pos_T)
        y = y + self.cross(self.ln2(y), mem_BLE, mask=mem_mask)
        return self.ffn(y)


class T5LM(nn.Module):

    def __init__(self, V, cfg):
        super().__init__()
        E = cfg.d_model
        self.emb = nn.Embedding(V, E)
        self.enc = nn.ModuleList(Block(E, cfg.n_head, causal=False, mix=cfg.lm_mix)
                                 for _ in range(cfg.enc_layers))
        self.dec = nn.ModuleList(DecoderLayer(E, cfg.n_head) for _ in range(cfg.dec_layers))
        self.norm_enc, self.norm_dec = RMSNorm(E), RMSNorm(E)
        for blk in self.enc:     # the conv's taps on the predecessors start random (not identity)
            if blk.mix_w is not None:
                nn.init.normal_(blk.mix_w.data[:, 1:], std=cfg.lm_mix_init)

    def encode(self, x_BLE, keep_BL):
        """Encoder over input embeddings (so that a soft prefix can come first) -> memory (B, L,
        E)."""
        pos, mask = torch.arange(x_BLE.shape[1], device=x_BLE.device), keep_BL[:, None, None, :]
        h = x_BLE
        for blk in self.enc:
            h = blk(h, pos, mask_LL=mask)
        return self.norm_enc(h)

    def encode_ids(self, ids_BT, pad_id):
        return self.encode(self.emb(ids_BT), ids_BT != pad_id)

    def decode(self, mem_BLE, keep_BL, y_BT):
        """Teacher-forced decoder: y_BT starts with <bos>; -> logits (B, T, V) of the next
        tokens."""
        h, pos = self.emb(y_BT), torch.arange(y_BT.shape[1], device=y_BT.device)
        for layer in self.dec:
            h = layer(h, mem_BLE, keep_BL[:, None, None, :], pos)
        return self.norm_dec(h) @ self.emb.weight.T * self.emb.weight.shape[1] ** -0.5

    @torch.no_grad()
    def generate(self, mem_BLE, keep_BL, bos, eos, max_new):
        """Greedy decoding (the short decoder re-run each step) -> (B, <= max_new) token ids."""
        y = torch.full((mem_BLE.shape[0], 1), bos, device=mem_BLE.device)
        done = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        for _ in range(max_new):
            nxt = self.decode(mem_BLE, keep_BL, y)[:, -1].argmax(-1).masked_fill(done, eos)
            y, done = torch.cat([y, nxt[:, None]], 1), done | (nxt == eos)
            if done.all():
                break
        return y[:, 1:]


def lm_pairs(ds):
    """Text-only (source, target) pairs: every question with the true caption as context, and the
    caption reproduced from it (what stage 2's 'caption:' prompt asks of the image)."""
    qa = [(f"context: {c} {qa_prompt(d['q'])}", d["a"])
          for c, qs in zip(ds["captions"], ds["qa"]) for d in qs]
    return qa, [(f"context: {c} {CAPTION_PROMPT}", c) for c in ds["captions"]]


def seq2seq_loss(lm, pairs, vocab, device):
    pad_id = vocab["<pad>"]
    x = pad([encode(vocab, s, bos=False) for s, _ in pairs], pad_id).to(device)
    y = pad([encode(vocab, t, eos=True) for _, t in pairs], pad_id).to(device)  # <bos> target <eos>
    logits = lm.decode(lm.encode_ids(x, pad_id), x != pad_id, y[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=pad_id)


def pretrain(world, vocab, cfg, device, metrics=None, seed=0):
    """--lm-scenes fresh text-only scenes (--data-dir: its train split); each step a batch of
    --lm-batch QA pairs and a quarter as many caption pairs; AdamW at cfg.lm_lr, 5% warm-up, cosine
    (data/layers.train_loop). seed: the initialisation, the scenes and the batch order (0: the
    default LM)."""
    torch.manual_seed(seed)
    lm = T5LM(len(vocab), cfg).to(device)
    qa, cap = lm_pairs(world["train"] if cfg.data_dir
                       else generate(cfg.lm_scenes, "train", seed=7 + seed, images=False))
    nq, nc = min(cfg.lm_batch, len(qa)), max(1, min(cfg.lm_batch // 4, len(cap)))
    it_q, it_c = batches(len(qa), nq, seed=2 + 10 * seed), batches(len(cap), nc, seed=3 + 10 * seed)
    train_loop(list(lm.parameters()),
               lambda s: seq2seq_loss(lm, [qa[i] for i in next(it_q)], vocab, device)
               + seq2seq_loss(lm, [cap[i] for i in next(it_c)], vocab, device),
               cfg.lm_steps, cfg, "T5 LM", device, lr=cfg.lm_lr, metrics=metrics)
    return lm.eval()


@torch.no_grad()
def first_word(lm, texts, vocab, device):
    """'context: ... question: ...' strings -> the first decoded token of each answer (greedy),
    (B,)."""
    x = pad([encode(vocab, s, bos=False) for s in texts], vocab["<pad>"]).to(device)
    bos = torch.full((len(x), 1), vocab["<bos>"], device=device)
    return lm.decode(lm.encode_ids(x, vocab["<pad>"]), x != vocab["<pad>"], bos)[:, 0].argmax(-1)


def load_or_pretrain(world, vocab, cfg, device, metrics=None, seed=0):
    """Pretrain the LM or load it from cfg.cache_dir (keyed by its config, seed, the vocabulary, the
    corpus and the build); metrics: a metrics.jsonl path for the pretraining loss."""
    keys = ("d_model", "enc_layers", "dec_layers", "n_head", "lm_mix", "lm_mix_init", "lm_steps",
            "lm_scenes", "lm_batch", "lm_lr", "dtype")
    return cached_lm(world, vocab, cfg, keys, f"t5lm_seed{seed}", lambda: T5LM(len(vocab), cfg),
                     lambda: pretrain(world, vocab, cfg, device, metrics, seed), device,
                     code=LM_CODE)


# what builds the LM: its cache key
LM_CODE = (DecoderLayer, T5LM, qa_prompt, lm_pairs, seq2seq_loss, pretrain)

"""Semantically grounded Q-Former vs the BLIP-2 two-stage Q-Former, on a laptop.

Paper: Choraria et al., "Semantically (v1: Language) Grounded QFormer for Efficient Vision Language
Understanding", arXiv 2311.07449; restated in ../shared/papers/qformer_efficient.md. Baseline:
BLIP-2 (Li et al. 2023, arXiv 2301.12597) and InstructBLIP (Dai et al. 2023, arXiv 2305.06500).
*** The paper has no public code and we only have its abstract: the method P below is a
RECONSTRUCTION from summaries, not the authors' implementation. *** The setting at length, the
results and things to try: docs/qformer_efficient.md. The command line, checks and reports come
after "Plumbing".

On the shapes world v2 (data/shapes.py), where answers need binding, between two frozen, cached,
gated backbones (the shared ViT of data/vision.py; the T5-style LM of data/t5lm.py, pretrained on
text alone), a BERT-like Q-Former (N_q queries and text share self-attention, separate FFNs,
cross-attention to the image tokens every other layer) is trained as one of these variants, on one
data stream per seed, with the same stage-2 settings (each variant's decoder memory: one function
in the table MEMORY):
    B1   BLIP-2 two-stage. Stage 1: ITC + ITM + ITG on captions (three masks: qformer_mask).
         Stage 2: query outputs -> linear -> soft prefix of the LM *encoder input*; LM loss.
    B2   no stage 1: the same stage 2 from a fresh Q-Former, so B1 - B2 measures stage 1 alone
         (both instruction-aware, as InstructBLIP, their word embeddings from the frozen LM's).
    P    grounded Q-Former (reconstruction): h_p = LM_encoder(prompt) once per prompt, frozen,
         no grad; z = QFormer([queries ; W_in h_p], image); decoder memory = [W_out z ; h_p];
         one LM loss. The LM encoder never sees a visual token; nothing backpropagates through it.
    P-a  ablation: decoder-side injection only (the Q-Former does not see the prompt).
    P-b  ablation: P's prompt-conditioned Q-Former, but fed through the LM encoder as B2 is.
    C0   control: P with the image blanked (the language-prior floor).
The comparison: the validation binding score against samples seen and training seconds; target =
0.9 x the best final score of any variant (per seed); samples and seconds to it (B1's stage 1
counted); what a step costs (step_costs); test VQA per type and captions (BLEU-4, CIDEr-style).

    python qformer_efficient.py               # B1, B2, P, seed 0: 13 min, 2 cores, backbones cached
    python qformer_efficient.py --seeds 1,2   # more seeds (the backbones come from the cache)
    python qformer_efficient.py --variants B1,B2,P,P-a,P-b,C0
    python qformer_efficient.py --quick       # every section on a tiny config, under a minute
    python qformer_efficient.py --data-dir DIR # real data: DIR/images.npy + DIR/annotations.jsonl

Shape legend:
    B = batch   Q = queries (N_q)   T = text tokens   P = image tokens (cells)   C = ViT width
    D = Q-Former width   E = LM width   L = a sequence (queries + text, or the LM's memory)
    V = vocabulary
"""

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import t5lm, vision
from data.captions import bleu4, cider
from data.layers import FFN, Attention, RMSNorm, batches, encode, pad, train_loop
from data.multimodal import (BACKBONES, EXPERIMENT, MultimodalConfig, backbone_seed,
                             backbone_world, compile_blocks, exact_match, gate_or_stop, oracle_cell,
                             out_flag, save_bridge, shapes_baselines, shapes_world,
                             text_ceiling_line, training_step_costs, validate_image_and_run)
from data.run import (check_numbers, check_ranges, flag, keep_previous, log_metrics,
                      main as run_main, mean_sd, mean_std, need, parse_flags, parse_list,
                      pick_device, print_outputs, pyplot, save_png, write_results)
from data.shapes import (QUESTION_TYPES, at_or_below_oracle, binding_score, oracle_reference,
                         reference_captions, scene_grid)
from data.t5lm import CAPTION_PROMPT, qa_prompt

EXTRA_TOKENS = ("<cls>", "<dec>")    # the Q-Former's BERT/BLIP-2 specials
GATE_TEXT = 0.95                     # the frozen LM, given the true caption, per question type


# ---- The Q-Former and its three stage-1 masks ----------------------------------------------------

def qformer_mask(n_q, keep_BT, kind):
    """Boolean 'may attend' mask (B, 1, Q+T, Q+T) over [queries ; text] (rows attend to columns; Q
    queries, T text); padded text is never attended. Stage 1 uses all three:
        uni     (ITC, unimodal): Q->Q, T->T only: queries and text never see each other
        bi      (ITM, bidirectional; also stage 2's instruction-aware Q-Former and P): everything
        causal  (ITG, multimodal causal): Q->Q; T->Q; T->T for earlier-or-same positions: the image
                reaches the text only through the queries"""
    B, T = keep_BT.shape
    L, dev = n_q + T, keep_BT.device
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
    """Shared self-attention over queries and text; cross-attention to the image for the query
    positions only (when `cross`); separate FFNs for query and text positions (as LAVIS)."""

    def __init__(self, dim, n_head, cross, img_dim):
        super().__init__()
        self.ln1, self.attn = RMSNorm(dim), Attention(dim, n_head)
        self.cross = Attention(dim, n_head, kv_dim=img_dim) if cross else None
        self.ln_c = RMSNorm(dim) if cross else None
        self.ffn_q, self.ffn_t = FFN(dim), FFN(dim)

    def forward(self, x_BLD, n_q, mask, img_BPC):
        x = x_BLD + self.attn(self.ln1(x_BLD), mask=mask)
        q, t = x[:, :n_q], x[:, n_q:]
        if self.cross is not None and n_q:
            q = q + self.cross(self.ln_c(q), img_BPC)
        return torch.cat([self.ffn_q(q), self.ffn_t(t)], 1)


class QFormer(nn.Module):
    def __init__(self, V, cfg, max_len=48):
        super().__init__()
        D, C = cfg.q_dim, cfg.vit_dim
        self.queries = nn.Parameter(torch.randn(cfg.queries, D) * 0.02)
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(torch.randn(max_len, D) * 0.02)
        self.img_norm = nn.LayerNorm(C)         # BLIP-2: trainable LayerNorm on the frozen features
        side = int(round(math.sqrt(cfg.image_tokens)))  # each token's cell: fixed 2-D sin-cos, RMS1
        self.register_buffer("img_pos", vision.sincos_2d(side, C), persistent=False)
        self.layers = nn.ModuleList(QFormerLayer(D, cfg.n_head, i % 2 == 0, C)
                                    for i in range(cfg.q_layers))
        self.norm = RMSNorm(D)

    def embed_text(self, ids_BT):
        return self.emb(ids_BT) + self.pos[: ids_BT.shape[1]]

    def forward(self, img_BPC, text_BTD, keep_BT, kind):
        """-> (query outputs (B, Q, D), text outputs (B, T, D)). text_BTD may be empty (T = 0)."""
        B, n_q = text_BTD.shape[0], self.queries.shape[0]
        x = torch.cat([self.queries.expand(B, -1, -1), text_BTD], 1)
        mask = qformer_mask(n_q, keep_BT, kind)
        img = self.img_norm(img_BPC) + self.img_pos.to(img_BPC.dtype)    # the keys know their cell
        for layer in self.layers:
            x = layer(x, n_q, mask, img)
        x = self.norm(x)
        return x[:, :n_q], x[:, n_q:]

    def text_logits(self, t_BTD):
        return t_BTD @ self.emb.weight.T * self.emb.weight.shape[1] ** -0.5   # tied head (ITG)


# ---- Stage 1 (B1 only): ITC + ITM + ITG ----------------------------------------------------------

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
    """For each row, one column sampled with p ∝ softmax(sim) over the columns that are NOT
    positives (same_BB: the diagonal, and any pair with an identical caption). A row with no
    negative falls back to any other index. -> (B,) column indices."""
    w = sim_BB.detach().float().softmax(-1).masked_fill(same_BB, 0.0)
    empty = w.sum(-1) <= 0
    w[empty] = (~torch.eye(len(w), dtype=torch.bool, device=w.device))[empty].float()
    return torch.multinomial(w, 1, generator=gen).squeeze(1)


def stage1_loss(qf, heads, img_BPC, cap_ids_BT, pad_id, vocab, gen):
    """L = ITC + ITM + ITG on one batch of (image features, caption ids without specials)."""
    B, dev = len(cap_ids_BT), img_BPC.device
    same = (cap_ids_BT[:, None, :] == cap_ids_BT[None, :, :]).all(-1)          # identical captions
    # ITC: unimodal mask; [CLS] + caption
    cls_ids = torch.cat([torch.full((B, 1), vocab["<cls>"], device=dev), cap_ids_BT], 1)
    z, t = qf(img_BPC, qf.embed_text(cls_ids), cls_ids != pad_id, "uni")
    sim, temp = itc_similarity(heads, z, t[:, 0]), heads.temp.clamp(0.001, 0.5)
    # targets: label smoothing 0.1 over the batch; a duplicate caption shares the positive mass
    tgt = 0.9 * same.float() / same.float().sum(1, keepdim=True) + 0.1 / B
    itc = (F.cross_entropy(sim / temp, tgt) + F.cross_entropy(sim.T / temp, tgt)) / 2
    # ITM: bidirectional mask; positives + a hard negative image per text and text per image
    neg_img, neg_txt = hard_negatives(sim.T, same, gen), hard_negatives(sim, same, gen)
    imgs = torch.cat([img_BPC, img_BPC[neg_img], img_BPC])
    txts = torch.cat([cls_ids, cls_ids, cls_ids[neg_txt]])
    zq, _ = qf(imgs, qf.embed_text(txts), txts != pad_id, "bi")
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(dev)
    itm = F.cross_entropy(heads.itm(zq).mean(1), labels)        # 2-way head, averaged over queries
    # ITG: multimodal causal mask; [DEC] caption <eos>, next-token loss on the text
    dec_ids = torch.cat([torch.full((B, 1), vocab["<dec>"], device=dev), cap_ids_BT,
                         torch.full((B, 1), pad_id, device=dev)], 1)
    dec_ids[torch.arange(B, device=dev), (cap_ids_BT != pad_id).sum(1) + 1] = vocab["<eos>"]
    _, tg = qf(img_BPC, qf.embed_text(dec_ids[:, :-1]), dec_ids[:, :-1] != pad_id, "causal")
    itg = F.cross_entropy(qf.text_logits(tg).flatten(0, 1).float(), dec_ids[:, 1:].flatten(),
                          ignore_index=pad_id, label_smoothing=0.1)
    return itc + itm + itg, dict(itc=itc.item(), itm=itm.item(), itg=itg.item())


@torch.no_grad()
def itc_recall_at_1(qf, heads, feats, captions, vocab, device, chunk=100):
    """Image -> text R@1 within chunks of 100 validation pairs (an identical caption is a hit)."""
    hits, n, chunk, pad_id = 0, 0, min(chunk, len(captions)), vocab["<pad>"]
    for i in range(0, len(captions) - chunk + 1, chunk):
        caps = captions[i:i + chunk]
        ids = pad([[vocab["<cls>"]] + encode(vocab, c, bos=False) for c in caps], pad_id).to(device)
        z, t = qf(feats[i:i + chunk].to(device), qf.embed_text(ids), ids != pad_id, "uni")
        pred = itc_similarity(heads, z, t[:, 0]).argmax(1).tolist()
        hits, n = hits + sum(caps[p] == caps[j] for j, p in enumerate(pred)), n + len(caps)
    return hits / max(n, 1)


# ---- Stage 2: the variants around one frozen LM --------------------------------------------------

class PromptCache:
    """h_p = LM_encoder(prompt), computed once per distinct prompt under no_grad (P, P-a, P-b, C0).
    One cache holds the encodings of the one frozen LM it is called with."""

    def __init__(self, vocab):
        self.vocab, self.store, self.computed = vocab, {}, 0

    def __call__(self, lm, prompts):
        """-> (h_p (B, T, E), keep (B, T)) for a list of prompt strings."""
        pad_id, dev = self.vocab["<pad>"], lm.emb.weight.device
        new = sorted({p for p in prompts if p not in self.store})
        if new:
            ids = pad([encode(self.vocab, p, bos=False) for p in new], pad_id).to(dev)
            with torch.no_grad():
                h = lm.encode_ids(ids, pad_id).float()
            for j, p in enumerate(new):
                self.store[p] = h[j, : int((ids[j] != pad_id).sum())]
            self.computed += len(new)
        hs = [self.store[p] for p in prompts]
        n_B = torch.tensor([len(h) for h in hs], device=dev)
        out = nn.utils.rnn.pad_sequence(hs, batch_first=True)             # zeros after each prompt
        return out, torch.arange(out.shape[1], device=dev) < n_B[:, None]


def text_embeddings_from_lm(qf, lm):
    """B1 and B2 read the prompt's words through the Q-Former's own embeddings, P through the
    frozen LM encoder. A random start would give P a head start in knowing the words (BLIP-2
    starts its Q-Former from BERT), so B1 and B2 start from the frozen LM's input embeddings
    (V, E): copied at equal widths, else through a fixed orthonormal map (lengths and angles
    kept when D > E; D orthonormal directions of them when D < E)."""
    w_VE = lm.emb.weight.detach()
    E, D = w_VE.shape[1], qf.emb.weight.shape[1]
    if E != D:
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(max(E, D), min(E, D), generator=g))
        w_VE = w_VE @ (q if E > D else q.T).to(w_VE)                # (V, E) @ (E, D) -> (V, D)
    with torch.no_grad():
        qf.emb.weight.copy_(w_VE)


class Bridge(nn.Module):
    """What a variant trains around the frozen LM: the Q-Former, W_out (query outputs -> LM width)
    and, where the Q-Former reads h_p, W_in (h_p -> Q-Former width). The frozen LM is an argument of
    every call, never an attribute: not a submodule, it stays out of the parameters the optimiser
    gets and out of the bridge's checkpoint (frozen where it is loaded: requires_grad_(False))."""

    def __init__(self, qformer, variant, vocab, cfg):
        super().__init__()
        self.qf, self.variant, self.vocab = qformer, variant, vocab
        self.out_proj = nn.Linear(cfg.q_dim, cfg.d_model)                          # W_out: D -> E
        self.in_proj = nn.Linear(cfg.d_model, cfg.q_dim) if variant in READS_H_P else None  # W_in
        self.cache = PromptCache(vocab)

    def memory(self, lm, img_BPC, prompts):
        """-> (decoder memory (B, L, E), keep (B, L)): the variant's function in MEMORY."""
        return MEMORY[self.variant](self, lm, img_BPC, prompts)

    def prompt_ids(self, prompts, device):
        ids = [encode(self.vocab, p, bos=False) for p in prompts]
        return pad(ids, self.vocab["<pad>"]).to(device)

    def loss(self, lm, img_BPC, prompts, targets):
        """Stage 2's one loss: the frozen decoder's next-token cross-entropy on the target."""
        mem, keep = self.memory(lm, img_BPC, prompts)
        pad_id = self.vocab["<pad>"]
        y = pad([encode(self.vocab, t, eos=True) for t in targets], pad_id).to(mem.device)
        logits = lm.decode(mem, keep, y[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), y[:, 1:].flatten(),
                               ignore_index=pad_id)

    @torch.no_grad()
    def answer(self, lm, img_BPC, prompts):
        """One decoder step: the answer's first word (every answer is one word). -> (B,) ids."""
        mem, keep = self.memory(lm, img_BPC, prompts)
        bos = torch.full((len(prompts), 1), self.vocab["<bos>"], device=mem.device)
        return lm.decode(mem, keep, bos)[:, 0].argmax(-1)

    @torch.no_grad()
    def generate(self, lm, img_BPC, prompts, max_new):
        mem, keep = self.memory(lm, img_BPC, prompts)
        out = lm.generate(mem, keep, self.vocab["<bos>"], self.vocab["<eos>"], max_new)
        inv = {i: w for w, i in self.vocab.items()}
        words = [[inv[t] for t in row] for row in out.tolist()]
        return [" ".join(w[: w.index("<eos>")] if "<eos>" in w else w) for w in words]   # to <eos>


# The decoder memory of each variant: one function each, and the table MEMORY of them. Each takes
# (bridge, the frozen lm, image tokens img_BPC (B, P, C), prompt strings) -> (memory (B, L, E),
# keep (B, L)). z_BQD: the Q-Former's query outputs; h_p (B, T, E), kp (B, T): the cached LM
# encoding of the prompt and its mask; ids_BT: the prompt's token ids.

def through_encoder(bridge, lm, z_BQD, ids_BT):
    """B1, B2, P-b: the queries are a soft prefix of the LM *encoder input*: memory =
    LM_encoder([W_out z ; emb(prompt)]), so the gradient reaches z through the frozen encoder."""
    keep = torch.cat([torch.ones(z_BQD.shape[:2], dtype=torch.bool, device=z_BQD.device),
                      ids_BT != bridge.vocab["<pad>"]], 1)
    return lm.encode(torch.cat([bridge.out_proj(z_BQD), lm.emb(ids_BT)], 1), keep), keep


def beside_prompt(bridge, z_BQD, h_p, kp):
    """P, P-a, C0: memory = [W_out z ; h_p]: the LM encoder never sees a visual token."""
    ones = torch.ones(z_BQD.shape[:2], dtype=torch.bool, device=z_BQD.device)
    return torch.cat([bridge.out_proj(z_BQD), h_p.to(z_BQD.dtype)], 1), torch.cat([ones, kp], 1)


def memory_b2(bridge, lm, img_BPC, prompts):
    """B2 (and B1 after its stage 1), instruction-aware as InstructBLIP: the prompt's words sit next
    to the queries, z = QFormer([queries ; emb_Q(prompt)], image);
    memory = LM_encoder([W_out z ; prompt])."""
    ids = bridge.prompt_ids(prompts, img_BPC.device)
    z, _ = bridge.qf(img_BPC, bridge.qf.embed_text(ids), ids != bridge.vocab["<pad>"], "bi")
    return through_encoder(bridge, lm, z, ids)


def memory_p(bridge, lm, img_BPC, prompts):
    """P: z = QFormer([queries ; W_in h_p], image); memory = [W_out z ; h_p]."""
    h_p, kp = bridge.cache(lm, prompts)
    z, _ = bridge.qf(img_BPC, bridge.in_proj(h_p), kp, "bi")
    return beside_prompt(bridge, z, h_p, kp)


def memory_p_a(bridge, lm, img_BPC, prompts):
    """P-a: z = QFormer(queries, image), the prompt unseen; memory = [W_out z ; h_p]."""
    h_p, kp = bridge.cache(lm, prompts)
    z, _ = bridge.qf(img_BPC, h_p.new_zeros(len(prompts), 0, bridge.qf.queries.shape[1]),
                     kp[:, :0], "bi")
    return beside_prompt(bridge, z, h_p, kp)


def memory_p_b(bridge, lm, img_BPC, prompts):
    """P-b: P's z = QFormer([queries ; W_in h_p], image), then memory as B2's:
    LM_encoder([W_out z ; prompt])."""
    h_p, kp = bridge.cache(lm, prompts)
    z, _ = bridge.qf(img_BPC, bridge.in_proj(h_p), kp, "bi")
    return through_encoder(bridge, lm, z, bridge.prompt_ids(prompts, img_BPC.device))


def memory_c0(bridge, lm, img_BPC, prompts):
    """C0: P with the image blanked (every image the same): the language-prior floor."""
    return memory_p(bridge, lm, torch.zeros_like(img_BPC), prompts)


MEMORY = {"B1": memory_b2, "B2": memory_b2, "P": memory_p, "P-a": memory_p_a, "P-b": memory_p_b,
          "C0": memory_c0}
READS_H_P = ("P", "P-b", "C0")          # the variants whose Q-Former reads h_p (through W_in)
VARIANTS = tuple(MEMORY)


# ---- Training one variant on the shared data stream, and the convergence comparison --------------

def stage2_stream(ds, cfg, seed):
    """The one data stream all variants of a seed train on: per step, batch_size (scene, prompt,
    target); a caption with probability caption_frac, otherwise one of the scene's questions."""
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


def batch_loss(model, lm, feats, items, device):
    """Stage 2's loss on one batch of the stream: (scene index, prompt, target) items."""
    scenes, prompts, targets = zip(*items)
    return model.loss(lm, feats[list(scenes)].to(device), list(prompts), list(targets))


def run_stage1(qf, feats, world, vocab, cfg, seed, device, metrics=None):
    """B1's stage 1, training the Q-Former in place -> its seconds, samples and ITC image->text R@1
    on val. metrics: a path."""
    heads, pad_id = Stage1Heads(cfg.q_dim).to(device), vocab["<pad>"]
    caps = [encode(vocab, c, bos=False) for c in world["train"]["captions"]]
    it = batches(len(caps), cfg.batch_size, seed=seed * 10 + 1)
    gen = torch.Generator(device=device).manual_seed(seed)

    def loss_fn(step):
        b = next(it)
        ids = pad([caps[i] for i in b], pad_id).to(device)
        return stage1_loss(qf, heads, feats["train"][b].to(device), ids, pad_id, vocab, gen)[0]

    t = time.perf_counter()
    train_loop(list(qf.parameters()) + list(heads.parameters()), loss_fn, cfg.stage1_steps, cfg,
               f"B1 seed {seed} stage 1", device, metrics=metrics)
    st = dict(stage1_s=time.perf_counter() - t, stage1_samples=cfg.stage1_steps * cfg.batch_size,
              itc_r1=itc_recall_at_1(qf, heads, feats["val"], world["val"]["captions"], vocab,
                                     device))
    print(f"  B1 stage 1: {st['stage1_s']:.0f} s, ITC image->text R@1 {st['itc_r1']:.3f} "
          "(chunks of 100 val pairs)")
    return st


def vqa_items(ds):
    return [(i, qa_prompt(d["q"]), d["a"], d.get("type", "other"))
            for i, qa in enumerate(ds["qa"]) for d in qa]


def score(point):
    """What the target is set on: the binding score (data without binding questions: VQA)."""
    return point["vqa"] if point["binding_score"] is None else point["binding_score"]


def text_ceiling(lm, ds, vocab, device):
    """The frozen LM given the true caption: 'context: <c> question: <q>' -> first decoded word
    == answer, per question type. The best a bridge could do with queries as good as the caption."""
    items = [(0, f"context: {c} {qa_prompt(d['q'])}", vocab.get(d["a"], -1), d["type"])
             for c, qs in zip(ds["captions"], ds["qa"]) for d in qs]
    return exact_match(lambda c: t5lm.first_word(lm, [p for _, p, _, _ in c], vocab, device), items,
                       bs=512)[1]


def vqa(model, lm, feats, items, vocab, device):
    """Exact match of the first answer word on vqa_items: overall, per type (exact_match)."""
    def predict(c):
        return model.answer(lm, feats[[i for i, *_ in c]].to(device), [p for _, p, _, _ in c])
    return exact_match(predict, [(i, p, vocab.get(a, -1), t) for i, p, a, t in items], bs=512)


def train_variant(variant, seed, lm, feats, world, vocab, stream, cfg, device, max_len,
                  metrics=None):
    """Stage 1 (B1 only), then stage 2 on `stream` -> (bridge, result dict with the learning curve:
    validation scores against samples seen and training seconds, evaluation time left out). metrics:
    a metrics.jsonl path for the training losses and the validation points of the curve."""
    torch.manual_seed(seed)
    qf = QFormer(len(vocab), cfg, max_len).to(device)
    if variant in ("B1", "B2") and cfg.text_init == "lm":
        text_embeddings_from_lm(qf, lm)
    res = dict(variant=variant, seed=seed, stage1_s=0.0, stage1_samples=0)
    if variant == "B1" and cfg.stage1_steps:
        res.update(run_stage1(qf, feats, world, vocab, cfg, seed, device, metrics))
    model = Bridge(qf, variant, vocab, cfg).to(device)
    compile_blocks(cfg, qf.layers)
    curve, eval_s, val_items, name = [], [0.0], vqa_items(world["val"]), f"{variant} seed {seed}"

    def evaluate(step):                                   # a point of the learning curve
        t = time.perf_counter()
        em, per_type = vqa(model, lm, feats["val"], val_items, vocab, device)
        eval_s[0] += time.perf_counter() - t
        curve.append(dict(step=step, samples=step * cfg.batch_size,
                          train_s=time.perf_counter() - t0 - eval_s[0], vqa=em,
                          binding_score=binding_score(per_type), per_type=per_type))
        if metrics:
            log_metrics(metrics, run=name, split="val", **curve[-1])

    def loss_fn(step):
        if step and step % cfg.eval_every == 0:
            evaluate(step)
        return batch_loss(model, lm, feats["train"], stream[step], device)

    t0 = time.perf_counter()
    train_loop(list(model.parameters()), loss_fn, cfg.steps, cfg, name, device, metrics=metrics)
    evaluate(cfg.steps)
    res.update(curve=curve, stage2_s=curve[-1]["train_s"], prompts_encoded=model.cache.computed,
               val_questions=len(val_items))
    return model, res


def step_costs(models, lm, stream, feats, cfg, device):
    """What one stage-2 step of each trained variant costs, on the same batches of the stream:
    memory, forward + backward, a whole step (data/multimodal.training_step_costs)."""
    return training_step_costs(models, lambda v, r: batch_loss(
        models[v], lm, feats, stream[r % len(stream)], device), cfg, device, 3 if cfg.quick else 15)


def final_eval(model, lm, feats, world, refs, vocab, device):
    """Test VQA per type, hold-out VQA, and greedy test captions against their references."""
    em, per_type = vqa(model, lm, feats["test"], vqa_items(world["test"]), vocab, device)
    hold = (vqa(model, lm, feats["holdout"], vqa_items(world["holdout"]), vocab, device)[0]
            if "holdout" in feats else None)
    refs, img = refs["test"], feats["test"]
    max_new = max(len(r[0].split()) for r in refs) + 2          # the longest reference, with room
    hyps = [h for i in range(0, len(refs), 256) for h in model.generate(
        lm, img[i:i + 256].to(device), [CAPTION_PROMPT] * len(refs[i:i + 256]), max_new)]
    return dict(vqa=em, binding_score=binding_score(per_type), per_type=per_type, holdout=hold,
                bleu4=bleu4(hyps, refs), cider=cider(hyps, refs), examples=hyps[:3])


def to_target(r, target):
    """First learning-curve point at or above the target binding score: samples and training
    seconds, B1's stage 1 included. (None, None) if never reached."""
    for c in r["curve"]:
        if score(c) >= target - 1e-9:
            return c["samples"] + r["stage1_samples"], c["train_s"] + r["stage1_s"]
    return None, None


def ratio(a, b):
    return a / b if a and b else None


def summarise(runs, cfg):
    """Per seed: the target (0.9 x the best final validation binding score of any variant, or
    --target-em), each variant's samples / seconds to it, and the claims as ratios. A variant that
    never reaches the target leaves its ratios None; so the claims are also measured against B2's
    own final score, which B2 reaches by definition: P's (or B1's, stage 1 counted) samples /
    seconds to it over B2's whole run."""
    out = {}
    for seed in sorted({r["seed"] for r in runs}):
        rs = {r["variant"]: r for r in runs if r["seed"] == seed}
        best = max(score(r["curve"][-1]) for r in rs.values())
        target = cfg.target_em if cfg.target_em > 0 else 0.9 * best
        for r in rs.values():
            r["samples_to_target"], r["seconds_to_target"] = to_target(r, target)
        s, b2 = dict(target=target), rs.get("B2")
        end = b2["curve"][-1] if b2 else None                 # B2's final validation point
        if (p := rs.get("P")) and b2:
            for k in ("samples", "seconds"):
                s[f"P_over_B2_{k}_to_target"] = ratio(p[f"{k}_to_target"], b2[f"{k}_to_target"])
            n, sec = to_target(p, score(end))
            s["P_to_B2_final_samples_ratio"] = ratio(n, end["samples"])
            s["P_to_B2_final_seconds_ratio"] = ratio(sec, end["train_s"])
            s["P_over_B2_step_time"] = ratio(p.get("fwd_bwd_ms"), b2.get("fwd_bwd_ms"))
            s["P_over_B2_memory"] = ratio(p["mem_mib"], b2["mem_mib"])
        if (b1 := rs.get("B1")) and b2:  # does stage 1 pay? (< 1: B1, stage 1 counted, is sooner)
            s["B1_over_B2_seconds_to_target"] = ratio(b1["seconds_to_target"],
                                                      b2["seconds_to_target"])
            s["B1_to_B2_final_seconds_ratio"] = ratio(to_target(b1, score(end))[1], end["train_s"])
            if b1["binding_score"] is not None:
                s["B1_minus_B2_binding"] = b1["binding_score"] - b2["binding_score"]
        out[str(seed)] = s
    return out


# ---- Data: the world, the vocabulary, reference captions -----------------------------------------

def load_data(cfg):
    """-> world (split -> dataset dict), vocabulary (+ the Q-Former's specials), reference captions
    per split (data/shapes.reference_captions)."""
    world, vocab = shapes_world(cfg)
    need(world["val"]["captions"], "--data-dir: no 'val' split (the learning curves are measured "
         "on it)")
    for w in EXTRA_TOKENS:
        vocab.setdefault(w, len(vocab))
    return world, vocab, {s: reference_captions(ds) for s, ds in world.items()}


# ---- The experiment ------------------------------------------------------------------------------

def frozen_backbones(cfg, world, vocab, seed, device, metrics=None):
    """The frozen ViT and LM of backbone seed `seed` (data/multimodal.backbone_world), each gate
    printed and checked before any bridge trains on them: a failing backbone stops the run
    (data/multimodal.gate_or_stop). -> (world, ViT tokens {split: (N, P, C)}, LM, gates)."""
    world = backbone_world(cfg, world, vocab, seed)
    _, feats, gates = vision.frozen_tokens(cfg, world, device, metrics, seed=seed)  # (N, P, C)
    lm = t5lm.load_or_pretrain(world, vocab, cfg, device, metrics, seed=seed).requires_grad_(False)
    compile_blocks(cfg, list(lm.enc) + list(lm.dec))
    ceiling = text_ceiling(lm, world["val"], vocab, device)    # val: the gate is a decision
    gate_or_stop(cfg, min(ceiling.values()) >= GATE_TEXT, text_ceiling_line(ceiling, GATE_TEXT)
                 + f" (LM seed {seed}, val)")
    return world, feats, lm, dict(gates, lm_text_ceiling=ceiling)


def run(cfg):
    """validate; then per seed: the frozen backbones, one data stream, every variant trained on it
    and tested, then what a step of each costs; results.json rewritten as they come; report."""
    variants, seeds = validate(cfg)                           # every user error, before any work
    device, start = pick_device(cfg.device), time.perf_counter()
    world, vocab, refs = load_data(cfg)
    keep_previous(cfg.out, also=lambda f: f.endswith(".png"))  # and the figures: nothing replaced
    metrics = os.path.join(cfg.out, "metrics.jsonl")      # training losses and the learning curves
    max_len = 2 + max(len(t.split()) for ds in world.values()
                      for t in ds["captions"] + [d["q"] for qa in ds["qa"] for d in qa])
    print(f"device {device}, vocab {len(vocab)}, train {len(world['train']['captions'])} scenes, "
          f"Q-Former {cfg.q_layers}x{cfg.q_dim} with {cfg.queries} queries, LM {cfg.enc_layers}+"
          f"{cfg.dec_layers}x{cfg.d_model}, variants {variants}, seeds {seeds}")
    base = shapes_baselines(world, cfg)                   # the data-only rows of the tables
    res, backbones = dict(config=asdict(cfg), baselines=base, runs=[], summary={}, gates={}), {}
    for seed in seeds:
        b = backbone_seed(cfg, seed)                  # 0 for every seed unless --vary-backbones
        if b not in backbones:
            backbones = {b: frozen_backbones(cfg, world, vocab, b, device, metrics)}
            res["gates"][str(b)] = backbones[b][3]
        world_b, feats, lm, _ = backbones[b]
        stream, models = stage2_stream(world_b["train"], cfg, seed), {}
        for v in variants:
            models[v], r = train_variant(v, seed, lm, feats, world_b, vocab, stream, cfg, device,
                                         max_len, metrics)
            r.update(final_eval(models[v], lm, feats, world_b, refs, vocab, device),
                     backbone_seed=b)
            r["at_or_below_oracle"] = at_or_below_oracle(
                dict(vqa=r["vqa"], binding_score=r["binding_score"], **r["per_type"]),
                base["test"]["bag_oracle"])
            print_run(r)
            res["runs"].append(r)
            save_bridge(cfg, f"{v}_seed{seed}", models[v], vocab, max_len=max_len)
            write_results(cfg.out, res)
        costs = step_costs(models, lm, stream, feats["train"], cfg, device)
        for r in res["runs"][-len(variants):]:                 # this seed's runs
            r.update(costs[r["variant"]])
        res["summary"] = summarise(res["runs"], cfg)
        write_results(cfg.out, res)
    res["wall_s"] = time.perf_counter() - start
    write_results(cfg.out, res)
    report(cfg, res, variants, world)
    return res


# ---- Plumbing: command line, validation, results, reports ----------------------------------------

def print_run(r):
    below = ", ".join(r["at_or_below_oracle"])
    print(f"  {r['variant']} seed {r['seed']}: VQA {r['vqa']:.3f}, binding "
          f"{mean_std([r['binding_score']])} ("
          + ", ".join(f"{t} {a:.2f}" for t, a in r["per_type"].items())
          + f"), hold-out {mean_std([r['holdout']])}, BLEU-4 {r['bleu4']:.3f}, CIDEr "
          f"{r['cider']:.2f}, stage 2 {r['stage2_s']:.0f} s; e.g. '{r['examples'][0]}'"
          + (f"; at or below the bag-of-words oracle: {below}" if below else ""))


CLAIMS = {"P_over_B2_samples_to_target": "P / B2: samples to target",
          "P_over_B2_seconds_to_target": "P / B2: seconds to target",
          "P_to_B2_final_samples_ratio": "P's samples to reach B2's final score / B2's samples",
          "P_to_B2_final_seconds_ratio": "P's seconds to reach B2's final score / B2's seconds",
          "P_over_B2_step_time": "P / B2: step time (forward + backward; goal <= 0.7)",
          "P_over_B2_memory": "P / B2: training memory",
          "B1_over_B2_seconds_to_target": "B1 (stage 1 counted) / B2: seconds to target",
          "B1_to_B2_final_seconds_ratio": "B1's seconds (stage 1 counted) to B2's final / B2's",
          "B1_minus_B2_binding": "B1 - B2: test binding score"}
QF = "Q-Former and its training"      # the --help group of this file's bridge flags


def report(cfg, res, variants, world):
    """The tables, the claims, then where the figures and results.json are."""
    by = {v: [r for r in res["runs"] if r["variant"] == v] for v in variants}
    print_test_table(res, by)
    print_cost_table(res, by)
    print_curve_table(res["runs"], by)
    claims = {k: xs for k in CLAIMS if (xs := [s[k] for s in res["summary"].values() if k in s])}
    if claims:
        print("\nthe claims (per-seed ratios, mean ± sample std; '-': a run that never got there)")
    for k, xs in claims.items():
        print(f"  {CLAIMS[k]:<64s} {mean_std(xs, '.2f')}")
    if r1 := [r["itc_r1"] for r in res["runs"] if "itc_r1" in r]:
        print(f"B1 stage 1 ITC image->text R@1: {mean_std(r1)}")
    print_outputs(figures(cfg, res, by, world), cfg.out, res["wall_s"])


def print_test_table(res, by):
    types = [t for t in QUESTION_TYPES if any(t in r["per_type"] for r in res["runs"])]
    keys = ["vqa", "binding_score"] + types + ["holdout", "bleu4", "cider"]
    ref = oracle_reference(res["baselines"]["test"]["bag_oracle"])
    row = lambda label, cells: print(f"{label:>11s}" + "".join(f"{c:>15s}" for c in cells))
    print("\ntest set, mean ± sample std over seeds")
    row("", ["VQA", "binding"] + types + ["hold-out", "BLEU-4", "CIDEr"])
    for v, rs in by.items():
        row(v, [oracle_cell([r["per_type"].get(k) if k in types else r[k] for r in rs], k, ref)
                for k in keys])
    for name in ("blind_prior", "bag_oracle"):
        if (b := res["baselines"]["test"][name]) is not None:
            row(name, [f"{b['overall']:.3f}", mean_std([binding_score(b)])]
                + [f"{b.get(t, float('nan')):.3f}" for t in types])
    if ref:
        print("* at or below the bag-of-words oracle (bag_oracle): the caption's words alone, "
              "without binding, score as much")


def print_cost_table(res, by):
    cols = ("samples to target", "s to target", "train ms/step", "fwd+bwd ms", "memory MiB")
    print(f"\ncost (target: 0.9 x the best final val binding score per seed, "
          f"{mean_std([s['target'] for s in res['summary'].values()])})\n" + f"{'':>11s}"
          + "".join(f"{c:>17s}" for c in cols))
    for v, rs in by.items():
        cells = [mean_std([r.get(k) for r in rs], f) for k, f in (
            ("samples_to_target", ".0f"), ("seconds_to_target", ".0f"), ("step_ms", ".0f"),
            ("fwd_bwd_ms", ".0f"), ("mem_mib", ".1f"))]
        cells[0] += f" ({sum(r['samples_to_target'] is not None for r in rs)}/{len(rs)})"  # reached
        print(f"{v:>11s}" + "".join(f"{x:>17s}" for x in cells))


def print_curve_table(runs, by):
    steps = [c["samples"] for c in runs[0]["curve"]]
    every = max(1, len(steps) // 8)
    pick = steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else [])
    print("\nvalidation binding score against samples seen (mean over seeds)\n"
          + f"{'samples':>11s}" + "".join(f"{s:>7d}" for s in pick))
    for v, rs in by.items():
        points = [(c["samples"], score(c)) for r in rs for c in r["curve"]]     # every seed's
        print(f"{v:>11s}" + "".join(f"{np.mean([y for x, y in points if x == s]):7.3f}"
                                    for s in pick))


def figures(cfg, res, by, world):
    """PNGs under --out when matplotlib is installed (else none): test scenes, and the validation
    binding score against samples seen and against training seconds (B1's stage 1 counted, as in 'to
    target'), mean ± sample std over seeds. -> their paths."""
    if (plt := pyplot()) is None:
        return []
    paths = [scene_grid(world["test"], os.path.join(cfg.out, "scenes.png"),
                        title="test scenes (shapes world v2)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for v, rs in by.items():
        for ax, x, s1 in ((axes[0], "samples", "stage1_samples"), (axes[1], "train_s", "stage1_s")):
            points = range(len(rs[0]["curve"]))
            xs = [np.mean([r["curve"][k][x] + r[s1] for r in rs]) for k in points]
            ms = [mean_sd([score(r["curve"][k]) for r in rs]) for k in points]
            line, = ax.plot(xs, [m for m, _ in ms], marker=".", label=v)
            if len(rs) > 1:
                ax.fill_between(xs, [m - sd for m, sd in ms], [m + sd for m, sd in ms], alpha=0.2,
                                color=line.get_color())
    target = np.mean([s["target"] for s in res["summary"].values()])
    for ax, xlabel in zip(axes, ("samples seen", "training seconds")):
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set(xlabel=f"{xlabel} (B1: stage 1 included)")
    axes[0].set(ylabel="validation binding score")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"quality against training compute (dotted: the target, {target:.3f}; "
                 f"{len(res['summary'])} seed(s))")
    paths.append(save_png(plt, fig, os.path.join(cfg.out, "binding_vs_compute.png")))
    return [p for p in paths if p]


@dataclass
class Config(MultimodalConfig):
    """The shared fields (data, the backbones, seeds, device ...: data/multimodal.py), and these."""
    lm_mix: int = flag(3, "Primer conv width in the LM encoder (1 = off)", BACKBONES)
    enc_layers: int = flag(3, "LM encoder blocks", BACKBONES)
    dec_layers: int = flag(2, "LM decoder blocks", BACKBONES)
    lm_mix_init: float = flag(0.5, "std of the LM conv's random taps on the predecessors at init "
                              "(0 = the identity)", BACKBONES)
    lm_steps: int = flag(3000, "text-only LM pretraining steps", BACKBONES)
    lm_batch: int = flag(256, "LM pretraining batch (QA pairs; 1/4 as many captions)", BACKBONES)
    batch_size: int = flag(64, "batch size of stage 1 and stage 2", QF)
    queries: int = flag(32, "learnable queries N_q", QF)
    q_dim: int = flag(64, "Q-Former width D", QF)
    q_layers: int = flag(4, "Q-Former blocks (cross-attention in every other one)", QF)
    variants: str = flag("B1,B2,P", f"comma-separated, from {', '.join(VARIANTS)}", QF)
    stage1_steps: int = flag(300, "B1's stage 1 steps (ITC + ITM + ITG)", QF)
    steps: int = flag(2000, "stage 2 steps of every variant", QF)
    lr: float = flag(2e-3, "AdamW learning rate (stages 1, 2; chosen on val)", QF)
    caption_frac: float = flag(0.25, "share of stage-2 items that are captions (chosen on val)", QF)
    text_init: str = flag("lm", "B1/B2's Q-Former word embeddings start from the frozen LM's input "
                          "embeddings (lm, as BLIP-2 starts from BERT) or at random", QF,
                          ("lm", "random"))
    eval_every: int = flag(200, "stage 2 steps between learning-curve points (on val)", EXPERIMENT)
    target_em: float = flag(-1.0, "binding-score target for 'samples to target', in (0, 1]; -1 = "
                            "0.9 x the best final score of any variant", EXPERIMENT)
    compile: bool = flag(False, "torch.compile the Q-Former and LM blocks (opt-in)", "run")
    out: str = out_flag("qformer_efficient")


QUICK = dict(n_train=400, n_eval=100, vit_dim=32, vit_layers=2, vit_steps=60, d_model=32,
             enc_layers=2, dec_layers=1, lm_steps=400, lm_scenes=2000, lm_batch=64, queries=8,
             q_dim=32, q_layers=2, stage1_steps=20, steps=150, batch_size=32, eval_every=30,
             out=os.path.join("out", "qformer_efficient_quick"))


def validate(cfg):
    """Every user error, before any training -> (variants, seeds)."""
    check_numbers(cfg, tuple("n_train n_eval patch vit_dim vit_layers image_tokens d_model "
                             "enc_layers dec_layers n_head lm_mix lm_scenes lm_batch lm_lr queries "
                             "q_dim q_layers steps batch_size lr eval_every".split()),
                  at_least_0=("vit_steps", "lm_steps", "stage1_steps", "lm_mix_init"))  # 0: skip
    check_ranges(vars(cfg), caption_frac="[0, 1]")
    need(cfg.target_em == -1 or 0 < cfg.target_em <= 1, "--target-em must be in (0, 1] (or -1 "
         f"for 0.9 x the best variant), got {cfg.target_em}")
    variants = parse_list(cfg.variants, str.strip, "variants")
    need(not (bad := [v for v in variants if v not in VARIANTS]), f"--variants: unknown "
         f"{', '.join(map(repr, bad))}; choose from {', '.join(VARIANTS)}")
    need(cfg.q_dim % cfg.n_head == 0, "--q-dim must be a multiple of --n-head")
    need(cfg.batch_size >= 2 or "B1" not in variants,
         "--batch-size must be at least 2 for B1 (ITC and ITM need in-batch negatives)")
    seeds = validate_image_and_run(cfg, vision.VisionConfig.batch_size)  # widths, data, seeds ...
    return variants, seeds


def parse(argv=None):
    """The command line -> Config: defaults < --quick's QUICK < the flags given."""
    return parse_flags(Config, argv, "qformer_efficient.py", __doc__, [("quick", True, QUICK)])


def main(argv=None):
    """parse -> run: validate -> the experiment -> report; bad input: one line on stderr, exit 2."""
    return run_main("qformer_efficient.py", run, parse(argv))


if __name__ == "__main__":
    main()

"""The transformer parts the frozen backbones (data/vision.py's ViT, the LMs of both multimodal
files) and the Q-Former share: tokenising and padding, RMSNorm, RoPE, the pre-norm block, attention,
the FFN, and the AdamW loop and index batches they are trained with. LAYER_CODE names what every
frozen backbone is built of, so that a change here retrains the cached backbones
(data/multimodal.build_key).

Shapes: B = batch, L = sequence, D = width, h = heads, d = head width."""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.run import autocast, log_metrics, progress

def encode(vocab, text, bos=True, eos=False):
    ids = [vocab.get(w, vocab["<unk>"]) for w in text.split()]
    return ([vocab["<bos>"]] if bos else []) + ids + ([vocab["<eos>"]] if eos else [])


def pad(seqs, value):
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


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
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()],
                     -1).to(x_BhLd.dtype)



class Block(nn.Module):
    """Pre-norm transformer block, causal (LM decoder) or bidirectional (ViT, LM encoder); RoPE when
    it is given positions. FFN width 4D. Per layer and sequence length L: QKV 6LD^2, attention 4L^2D
    + out-proj 2LD^2, FFN 16LD^2.
    mix=K > 1: Primer's depthwise causal convolution over the sequence on q, k and v (So et al.
    2021, "Primer", Multi-DConv-Head Attention): z'_i = sum_{k<K} w_k * z_{i-k}, per channel. A key
    then also carries the tokens just before it, so "the word before the one I look for" is one
    attention hop instead of two (docs/multimodal_align.md: what it changed for the shapes LM).
    Elementwise (6KLD FLOPs), so the FLOP counter and the formula leave it out, as they leave out
    norms and RoPE."""

    def __init__(self, dim, n_head, causal, mix=1):
        super().__init__()
        self.nh, self.causal = n_head, causal
        self.ln1, self.ln2 = RMSNorm(dim), RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc1, self.fc2 = (nn.Linear(dim, 4 * dim, bias=False),
                              nn.Linear(4 * dim, dim, bias=False))
        self.mix_w = None
        if mix > 1:  # causal in the sequence even when attention is not
            w = torch.zeros(3 * dim, mix)
            w[:, 0] = 1.0                                      # starts as the plain block
            self.mix_w = nn.Parameter(w)

    def mix(self, z_BLC):
        """z'_i = sum_k w_k * z_(i-k), zero before the start: shifted copies."""
        out = z_BLC * self.mix_w[:, 0]
        for k in range(1, self.mix_w.shape[1]):
            # also when k >= L
            out = out + F.pad(z_BLC, (0, 0, k, 0))[:, :z_BLC.shape[1]] * self.mix_w[:, k]
        return out

    def attn_qkv(self, x_BLD, pos_L, **mix_kw):
        B, L, D = x_BLD.shape
        z = self.qkv(self.ln1(x_BLD))
        if self.mix_w is not None:
            z = self.mix(z, **mix_kw)
        q, k, v = z.view(B, L, 3, self.nh, D // self.nh).permute(2, 0, 3, 1, 4)
        if pos_L is not None:
            q, k = rope(q, pos_L), rope(k, pos_L)
        return q, k, v                                                          # (B, h, L, hd) each

    def finish(self, x_BLD, y_BhLd):
        B, L, D = x_BLD.shape
        x = x_BLD + self.proj(y_BhLd.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    def forward(self, x_BLD, pos_L=None, mask_LL=None):
        """mask_LL: boolean 'may attend' (overrides causal)."""
        q, k, v = self.attn_qkv(x_BLD, pos_L)
        if mask_LL is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.finish(x_BLD, y)


class Attention(nn.Module):
    """Multi-head attention; kv_BMC (cross-attention) may have another width than x. RoPE when pos_L
    is given."""

    def __init__(self, dim, n_head, kv_dim=None):
        super().__init__()
        self.nh = n_head
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BLD, kv_BMC=None, mask=None, causal=False, pos_L=None):
        """mask: boolean 'may attend', broadcastable to (B, h, L, M)."""
        B, L, D = x_BLD.shape
        kv = x_BLD if kv_BMC is None else kv_BMC
        q = self.q(x_BLD).view(B, L, self.nh, -1).transpose(1, 2)
        k, v = self.kv(kv).view(B, kv.shape[1], 2, self.nh, -1).permute(2, 0, 3, 1, 4)
        if pos_L is not None:
            q, k = rope(q, pos_L), rope(k, pos_L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=causal and mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class FFN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln, self.fc1, self.fc2 = (RMSNorm(dim), nn.Linear(dim, 4 * dim, bias=False),
                                       nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


def train_loop(params, loss_fn, steps, cfg, desc, device, lr=None, metrics=None):
    """AdamW with linear warm-up (5%) and cosine decay to 10%; loss_fn(step) -> scalar loss. lr:
    cfg.lr if None. metrics: a metrics.jsonl path that gets {run, step, loss, lr} every 50 steps.
    Returns the last loss (None for 0 steps: the flags that set steps allow 0, e.g. to skip a
    stage)."""
    if steps == 0:
        return None
    peak = cfg.lr if lr is None else lr
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.01)
    warm = max(1, steps // 20)
    bar = progress(range(steps), desc, quiet=steps < 20)
    for step in bar:
        now = (peak * min(1.0, (step + 1) / warm)
               * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))))
        for g in opt.param_groups:
            g["lr"] = now
        with autocast(cfg, device):
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if metrics:
                log_metrics(metrics, run=desc, step=step + 1, loss=round(loss.item(), 5), lr=now)
    return loss.item()



def batches(n, bs, seed):
    """Deterministic stream of index batches over n items."""
    if n < bs:
        raise ValueError(f"batches: {n} items cannot fill a batch of {bs}")
    g = np.random.default_rng(seed)
    while True:
        perm = g.permutation(n)
        for i in range(0, n - bs + 1, bs):
            yield perm[i:i + bs]



# what every frozen backbone is built of
LAYER_CODE = (RMSNorm, rope, Block, Attention, FFN, autocast, train_loop)

"""Q-Former: the three stage-1 masks, image positions, hard negatives, the frozen LM (gradients,
the prompt cache, greedy decoding), the convergence summary, and main(): a smoke run of every
variant with its printed sections, a deterministic rerun, checkpoints, a --data-dir run and the
bad-input matrix. (BLEU-4 and CIDEr: tests/test_captions.py.)"""

import ast
import contextlib
import io
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import qformer_efficient as qfe
from data import t5lm, vision
from data.shapes import BINDING_TYPES, QUESTION_TYPES, generate, save_dir

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
V = 40
UNIT = dict(queries=3, q_dim=16, q_layers=2, vit_dim=16, image_tokens=9, n_head=2, d_model=16,
            enc_layers=2, dec_layers=1)
# every main() call: a 4x4 patch grid pooled to 2x2 image tokens, backbones of one block, few steps
TINY = dict(n_train=120, n_eval=30, image_size=16, patch=4, vit_dim=16, vit_layers=1, vit_steps=2,
            image_tokens=4, d_model=16, enc_layers=1, dec_layers=1, n_head=2, lm_steps=2,
            lm_scenes=100, lm_batch=16, queries=4, q_dim=16, q_layers=2, stage1_steps=2, steps=3,
            batch_size=8, eval_every=1, seeds="0", device="cpu",
            ignore_gates=True)   # backbones this small fail their gates


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: with two threads on a busy 2-core machine each op waits on the other
    job (a main() call took 44 s instead of 3 s). One thread for this file, restored after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def argv(out, cache, **kw):
    args = dict(TINY, **kw)
    flags = [(f"--{k.replace('_', '-')}", v) for k, v in args.items() if v is not False]
    return ([x for f, v in flags for x in ((f,) if v is True else (f, str(v)))]
            + ["--out", str(out), "--cache-dir", str(cache)])


def tiny_qformer(seed=0):
    torch.manual_seed(seed)
    cfg = qfe.Config(**UNIT)
    return cfg, qfe.QFormer(V, cfg).double().eval()


def inputs(cfg, B=3, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, cfg.image_tokens, cfg.vit_dim, generator=g, dtype=torch.float64)
    return img, torch.randint(4, V, (B, T), generator=g)


def other_image(img):
    """Another image of the same shape. (Not img * a + b: the Q-Former's LayerNorm on the image
    tokens makes that the same image, so a test using it could not fail.)"""
    return torch.randn(img.shape, generator=torch.Generator().manual_seed(9), dtype=img.dtype)


def run_qf(qf, img, ids, kind):
    return qf(img, qf.embed_text(ids), torch.ones_like(ids, dtype=torch.bool), kind)


# --------------------------------------------------------------------------------------------------
# The file stands alone
# --------------------------------------------------------------------------------------------------

def imported_roots(path):
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            roots.add(node.module.split(".")[0])
    return roots


def test_imports_only_stdlib_torch_numpy_and_the_shared_modules():
    """One paper, one file: qformer_efficient.py uses the standard library, torch, numpy and the
    shared data/ and kernels/ packages, never another paper file (not even through data/ or
    kernels/)."""
    papers = ({"moe_testbed", "multimodal_align", "logit_correction"}
              | {p.stem for p in ROOT.glob("*.py")})
    papers.discard("qformer_efficient")
    roots = imported_roots(ROOT / "qformer_efficient.py")
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy", "data", "kernels"}
    assert roots <= allowed, roots - allowed
    assert not roots & papers
    assert {"data"} <= roots                                         # the walk does see the imports
    for shared in sorted((ROOT / "data").glob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        assert not imported_roots(shared) & papers, shared.name
    src = (ROOT / "qformer_efficient.py").read_text()
    # no import the walk above cannot see
    assert "import_module" not in src and "__import__" not in src


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------

def test_mask_matrices_by_hand():
    """The three masks of BLIP-2's stage 1, written out for 2 queries and 3 text positions (the last
    padded)."""
    keep = torch.tensor([[True, True, False]])
    want = {
        "uni": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0],
                [0, 0, 1, 1, 0]],
        "bi": [[1, 1, 1, 1, 0]] * 5,
        "causal": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                   [1, 1, 1, 1, 0]],
    }
    for kind, m in want.items():
        got = qfe.qformer_mask(2, keep, kind)
        assert got.shape == (1, 1, 5, 5) and got.dtype == torch.bool
        assert got[0, 0].tolist() == [[bool(v) for v in row] for row in m], kind
    with pytest.raises(ValueError):
        qfe.qformer_mask(2, keep, "diagonal")


def test_itc_unimodal_mask_separates_queries_and_text():
    """ITC: the query outputs do not depend on the text, the text outputs not on the image."""
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    ids2 = ids.clone()
    ids2[:, 2:] = (ids2[:, 2:] + 7) % (V - 4) + 4
    z1, t1 = run_qf(qf, img, ids, "uni")
    z2, t2 = run_qf(qf, img, ids2, "uni")
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-12)
    assert (t1 - t2).abs().max() > 1e-6
    z3, t3 = run_qf(qf, other_image(img), ids, "uni")
    torch.testing.assert_close(t1, t3, rtol=0, atol=1e-12)
    assert (z1 - z3).abs().max() > 1e-6


def test_itg_multimodal_causal_mask():
    """ITG: queries see no text; text position t sees no later text; every text position sees the
    image (through the queries)."""
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    z1, t1 = run_qf(qf, img, ids, "causal")
    ids2 = ids.clone()
    ids2[:, 4:] = (ids2[:, 4:] + 5) % (V - 4) + 4                    # change text positions 4, 5
    z2, t2 = run_qf(qf, img, ids2, "causal")
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-12)
    torch.testing.assert_close(t1[:, :4], t2[:, :4], rtol=0, atol=1e-12)
    assert (t1[:, 4:] - t2[:, 4:]).abs().max() > 1e-6
    _, t3 = run_qf(qf, other_image(img), ids, "causal")
    assert ((t1 - t3).abs().amax(-1) > 1e-9).all()


def test_itg_image_reaches_text_only_through_queries():
    """Only the query rows cross-attend, and to the image tokens: text can learn about the image
    only from the queries, in every mask."""
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    seen = []
    for layer in qf.layers:
        if layer.cross is not None:
            layer.cross.register_forward_hook(
                lambda m, a, o: seen.append((a[0].shape[1], a[1].shape[1])))
    for kind in ("uni", "bi", "causal"):
        run_qf(qf, img, ids, kind)
    assert len(seen) == 3 * sum(layer.cross is not None for layer in qf.layers) > 0
    assert set(seen) == {(cfg.queries, cfg.image_tokens)}


def test_itm_bidirectional_full_visibility():
    """ITM / stage 2: every position sees every other: the queries and the first word see the last
    word."""
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    assert qfe.qformer_mask(cfg.queries, torch.ones(2, 5, dtype=torch.bool), "bi").all()
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 3) % (V - 4) + 4
    z1, t1 = run_qf(qf, img, ids, "bi")
    z2, t2 = run_qf(qf, img, ids2, "bi")
    assert ((z1 - z2).abs().amax((1, 2)) > 1e-6).all()
    assert ((t1[:, 0] - t2[:, 0]).abs().amax(-1) > 1e-6).all()


def test_padding_is_never_attended():
    """Whatever sits in padded text slots changes no query output and no unpadded text output."""
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, -2:] = False
    ids2 = ids.clone()
    ids2[:, -2:] = 5
    for kind in ("uni", "bi", "causal"):
        z1, t1 = qf(img, qf.embed_text(ids), keep, kind)
        z2, t2 = qf(img, qf.embed_text(ids2), keep, kind)
        torch.testing.assert_close(z1, z2, rtol=0, atol=1e-12)
        torch.testing.assert_close(t1[:, :-2], t2[:, :-2], rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Image positions
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["uni", "bi"])
def test_image_position_reaches_the_queries(kind):
    """Attention over a set is blind to order: the fixed img_pos table, tied to the token index, is
    what tells the queries which cell a token came from. Permuting the image tokens changes the
    query outputs; with img_pos zeroed the same permutation changes nothing."""
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 7, 3, 5])
    assert qf.img_pos.shape == (cfg.image_tokens, cfg.vit_dim) and qf.img_pos.abs().sum() > 0
    z1, _ = run_qf(qf, img, ids, kind)
    z2, _ = run_qf(qf, img[:, perm], ids, kind)
    assert (z1 - z2).abs().amax((1, 2)).min() > 1e-4
    with torch.no_grad():
        qf.img_pos.zero_()
    z1, _ = run_qf(qf, img, ids, kind)
    z2, _ = run_qf(qf, img[:, perm], ids, kind)
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Stage 1 pieces
# --------------------------------------------------------------------------------------------------

def test_itc_similarity_is_max_over_queries():
    """s(i, j) = max over the queries k of cos(z_ik, t_j), against a loop."""
    torch.manual_seed(0)
    heads = qfe.Stage1Heads(8, dim=4).double()
    z, t = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        sim = qfe.itc_similarity(heads, z, t)
        zi = torch.nn.functional.normalize(heads.img_proj(z), dim=-1)
        zt = torch.nn.functional.normalize(heads.txt_proj(t), dim=-1)
    assert sim.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert abs(sim[i, j].item() - max(float(zi[i, k] @ zt[j]) for k in range(5))) < 1e-12


def test_hard_negatives_never_pick_a_positive():
    """Neither the diagonal nor an identical caption is ever sampled, even when they are by far the
    most similar."""
    g = torch.Generator().manual_seed(0)
    B = 12
    same = torch.eye(B, dtype=torch.bool)
    same[2, 5] = same[5, 2] = True
    for _ in range(200):
        sim = torch.randn(B, B, generator=g) * 5
        sim[torch.arange(B), torch.arange(B)] = 50
        sim[2, 5] = 50
        idx = qfe.hard_negatives(sim, same, g)
        assert not same[torch.arange(B), idx].any()


def test_hard_negatives_follow_similarity():
    """Sampling is p ∝ softmax(sim) over the negatives: a column at +8 is drawn ~99.9% of the time.
    """
    g = torch.Generator().manual_seed(1)
    B = 6
    sim = torch.zeros(B, B)
    sim[:, 3] = 8.0
    idx = torch.stack([qfe.hard_negatives(sim, torch.eye(B, dtype=torch.bool), g)
                       for _ in range(300)])
    share = (idx[:, [0, 1, 2, 4, 5]] == 3).float().mean().item()
    assert share > 0.95
    assert (idx[:, 3] != 3).all()


def test_hard_negatives_row_without_negatives_falls_back():
    """When every caption in the batch is identical, any other index is used (never the row itself).
    """
    g = torch.Generator().manual_seed(0)
    idx = qfe.hard_negatives(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool), g)
    assert (idx != torch.arange(3)).all()


def test_stage1_loss_trains_the_qformer():
    """ITC + ITM + ITG: every part reaches the Q-Former and the heads, and a few steps on one batch
    lower it."""
    cfg, qf = tiny_qformer()
    qf = qf.float().train()
    heads = qfe.Stage1Heads(cfg.q_dim)
    vocab = {"<pad>": 0, "<cls>": 1, "<dec>": 2, "<eos>": 3}
    img = torch.randn(4, cfg.image_tokens, cfg.vit_dim, generator=torch.Generator().manual_seed(2))
    caps = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [5, 6, 7, 0], [10, 11, 12, 13]])  # 0 = 2
    loss, parts = qfe.stage1_loss(qf, heads, img, caps, 0, vocab, torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and set(parts) == {"itc", "itm", "itg"}
    assert loss.item() == pytest.approx(sum(parts.values()), rel=1e-5)
    loss.backward()
    for p in (qf.queries, qf.emb.weight, qf.img_norm.weight, heads.temp, heads.itm.weight,
              heads.txt_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    opt = torch.optim.Adam(list(qf.parameters()) + list(heads.parameters()), lr=3e-3)
    first = None
    for _ in range(30):
        gen = torch.Generator().manual_seed(0)
        loss, parts = qfe.stage1_loss(qf, heads, img, caps, 0, vocab, gen)
        first = first or parts
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["itg"] < 0.7 * first["itg"]
    assert parts["itc"] + parts["itm"] < first["itc"] + first["itm"]


# --------------------------------------------------------------------------------------------------
# Stage 2: the frozen LM, the variants, the prompt cache
# --------------------------------------------------------------------------------------------------

WORDS = ("<pad> <bos> <eos> <unk> <cls> <dec> question: caption: what colour is the circle square "
         "? red a").split()
PROMPTS = ["question: what colour is the circle ?", "question: what colour is the square ?",
           "caption:"]
TARGETS = ["red", "red", "a red circle"]


def tiny_bridge(variant):
    torch.manual_seed(0)
    cfg = qfe.Config(**UNIT)
    vocab = {w: i for i, w in enumerate(WORDS)}
    lm = t5lm.T5LM(len(vocab), cfg)
    for blk in lm.enc:                  # the conv starts as the identity: make it mix, so the cache
        blk.mix_w.data.normal_()               # tests cover it
    model = qfe.Bridge(qfe.QFormer(len(vocab), cfg), variant, vocab, cfg)
    img = torch.randn(3, cfg.image_tokens, cfg.vit_dim)
    return lm, model, img


def lm_grads(lm, part):
    return [p.grad for n, p in lm.named_parameters() if n.startswith(part)]


@pytest.mark.parametrize("variant", ["P", "P-a", "C0"])
def test_grounded_variants_never_backpropagate_through_the_lm_encoder(variant):
    """P, P-a, C0: the LM encoder only ever sees the prompt, under no_grad. Even with the LM left
    trainable (on purpose) no encoder parameter gets a gradient, while the decoder and the Q-Former
    side do."""
    lm, model, img = tiny_bridge(variant)
    model.loss(lm, img, PROMPTS, TARGETS).backward()
    assert all(g is None for g in lm_grads(lm, ("enc.", "norm_enc")))
    assert lm.dec[0].cross.q.weight.grad is not None
    assert model.qf.queries.grad.abs().sum() > 0 and model.out_proj.weight.grad.abs().sum() > 0
    if variant != "P-a":                                    # P-a's Q-Former does not see the prompt
        assert model.in_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["B1", "B2", "P-b"])
def test_prefix_variants_train_the_qformer_through_the_frozen_encoder(variant):
    """B1, B2, P-b put the queries into the LM encoder's input: with a trainable LM its encoder gets
    gradients (the contrast that keeps the test above honest); frozen as in run(), the LM gets none
    and the gradient still reaches the Q-Former through the encoder."""
    lm, model, img = tiny_bridge(variant)
    model.loss(lm, img, PROMPTS, TARGETS).backward()
    assert lm.enc[0].qkv.weight.grad.abs().sum() > 0
    lm, model, img = tiny_bridge(variant)
    lm.requires_grad_(False)
    model.loss(lm, img, PROMPTS, TARGETS).backward()
    assert all(p.grad is None for p in lm.parameters())
    assert model.qf.queries.grad.abs().sum() > 0 and model.out_proj.weight.grad.abs().sum() > 0
    if variant == "P-b":
        assert model.in_proj.weight.grad.abs().sum() > 0


def test_lm_conv_starts_mixing_unless_told_not_to():
    """--lm-mix-init: the LM encoder's conv taps on the two predecessors start random (std as
    given); 0 keeps data/layers.Block's identity start."""
    torch.manual_seed(0)
    w = [b.mix_w for b in t5lm.T5LM(V, qfe.Config(**UNIT, lm_mix=3, lm_mix_init=0.5)).enc]
    assert all(torch.equal(x[:, 0], torch.ones(len(x))) and 0.3 < x[:, 1:].std() < 0.7 for x in w)
    w = [b.mix_w for b in t5lm.T5LM(V, qfe.Config(**UNIT, lm_mix=3, lm_mix_init=0.0)).enc]
    assert all(torch.equal(x[:, 1:], torch.zeros_like(x[:, 1:])) for x in w)


@pytest.mark.parametrize("q_dim", [16, 8, 32])
def test_b1_b2_words_start_from_the_lm_input_embeddings(q_dim):
    """text_embeddings_from_lm: at equal widths the Q-Former's word embeddings are the LM's; wider,
    every word keeps its length and every pair its angle (an orthonormal map); narrower, a
    projection of them."""
    cfg = qfe.Config(**dict(UNIT, q_dim=q_dim))
    lm, qf = t5lm.T5LM(V, cfg), qfe.QFormer(V, cfg)
    qfe.text_embeddings_from_lm(qf, lm)
    w, e = qf.emb.weight.detach().double(), lm.emb.weight.detach().double()
    if q_dim == cfg.d_model:
        assert torch.equal(qf.emb.weight, lm.emb.weight)
    gram = w @ w.T if q_dim >= cfg.d_model else None
    if gram is not None:                                  # no information lost: lengths, angles
        assert torch.allclose(gram, e @ e.T, atol=1e-4)
    else:
        assert w.shape == (V, q_dim) and not torch.allclose(w, torch.zeros_like(w))


def test_prompt_encoded_once_per_prompt(monkeypatch):
    """P encodes each distinct prompt once, in one batch, then reuses it; a new prompt costs one
    more encoding."""
    lm, model, img = tiny_bridge("P")
    calls, orig = [], lm.encode
    monkeypatch.setattr(lm, "encode", lambda *a, **k: calls.append(a[0].shape[0]) or orig(*a, **k))
    model.loss(lm, img, PROMPTS, TARGETS)
    model.loss(lm, img, PROMPTS[::-1], TARGETS[::-1])
    model.loss(lm, img[:2], [PROMPTS[0], PROMPTS[0]], ["red", "red"])
    assert model.cache.computed == 3 and calls == [3]
    model.loss(lm, img[:1], ["question: what colour is the square square ?"], ["red"])
    assert model.cache.computed == 4 and calls == [3, 1]


def test_cached_prompt_equals_encoding_it_alone():
    """Batching prompts of other lengths (padding) does not change a prompt's encoding."""
    lm, model, img = tiny_bridge("P")
    h, keep = model.cache(lm, PROMPTS)
    for j, p in enumerate(PROMPTS):
        ids = torch.tensor([qfe.encode(model.vocab, p, bos=False)])
        with torch.no_grad():
            alone = lm.encode_ids(ids, model.vocab["<pad>"])[0]
        n = int(keep[j].sum())
        assert n == ids.shape[1] and not keep[j, n:].any()
        torch.testing.assert_close(h[j, :n], alone, rtol=1e-5, atol=1e-5)


def test_a_one_word_prompt_can_be_encoded_alone():
    """'caption:' is one token, and P encodes it alone whenever it is the only new prompt of a
    batch: with --caption-frac 1 at the first step, with --caption-frac 0 at the captioning
    evaluation."""
    lm, model, img = tiny_bridge("P")
    h, keep = model.cache(lm, ["caption:"])
    assert h.shape[:2] == (1, 1) and keep.all()


def test_p_memory_is_queries_then_encoded_prompt():
    """P's decoder memory: [W_out z ; h_p], with z = QFormer([queries ; W_in h_p], image), all
    queries kept."""
    lm, model, img = tiny_bridge("P")
    mem, keep = model.memory(lm, img, PROMPTS)
    h, kp = model.cache(lm, PROMPTS)
    z, _ = model.qf(img, model.in_proj(h), kp, "bi")
    torch.testing.assert_close(mem, torch.cat([model.out_proj(z), h], 1))
    torch.testing.assert_close(keep,
                               torch.cat([torch.ones(3, z.shape[1], dtype=torch.bool), kp], 1))


def test_c0_ignores_the_image_and_p_does_not():
    """C0 (the language-prior floor) gives the same memory for any image; P, the same model
    otherwise, does not."""
    lm, c0, img = tiny_bridge("C0")
    torch.testing.assert_close(c0.memory(lm, img, PROMPTS)[0],
                               c0.memory(lm, other_image(img), PROMPTS)[0])
    lm, p, img = tiny_bridge("P")
    assert (p.memory(lm, img, PROMPTS)[0]
            - p.memory(lm, other_image(img), PROMPTS)[0]).abs().max() > 1e-4


def test_one_memory_function_per_variant():
    """MEMORY: a function per variant (B1 is B2 after stage 1: the same memory); W_in exactly where
    the Q-Former reads h_p; every memory is [queries ; prompt] long, the queries always kept."""
    assert qfe.VARIANTS == tuple(qfe.MEMORY) == ("B1", "B2", "P", "P-a", "P-b", "C0")
    assert qfe.MEMORY["B1"] is qfe.MEMORY["B2"] and len(set(qfe.MEMORY.values())) == 5
    for v in qfe.VARIANTS:
        lm, model, img = tiny_bridge(v)
        assert (model.in_proj is not None) == (v in qfe.READS_H_P)
        mem, keep = model.memory(lm, img, PROMPTS)
        n_q, T = model.qf.queries.shape[0], max(len(p.split()) for p in PROMPTS)
        assert mem.shape == (3, n_q + T, lm.emb.weight.shape[1]) and keep.shape == mem.shape[:2]
        assert keep[:, :n_q].all() and keep[:, n_q:].sum(1).tolist() == [7, 7, 1]


def test_the_frozen_lm_is_no_part_of_the_bridge():
    """The LM is passed to every call: no submodule of the Bridge, none of its parameters, no
    checkpoint key."""
    lm, model, img = tiny_bridge("P-b")
    assert not any(m is lm for m in model.modules())
    lm_params = {id(p) for p in lm.parameters()}
    assert not any(id(p) in lm_params for p in model.parameters())
    assert {k.split(".")[0] for k in model.state_dict()} == {"qf", "out_proj", "in_proj"}


def test_step_costs_measure_every_variant_and_leave_the_weights():
    """step_costs, after training: memory, forward + backward and whole-step times per variant, on
    the same batches; the timed AdamW steps (lr 0) change no weight and leave no gradient."""
    models, lm = {}, None
    for v in ("B2", "P"):
        lm_v, models[v], img = tiny_bridge(v)
        lm = lm or lm_v.requires_grad_(False)
    feats = torch.randn(4, *img.shape[1:])
    stream = [[(0, PROMPTS[0], "red"), (1, PROMPTS[2], "a red circle")],
              [(2, PROMPTS[1], "red"), (3, PROMPTS[0], "red")]]
    before = {v: {k: t.clone() for k, t in m.state_dict().items()} for v, m in models.items()}
    costs = qfe.step_costs(models, lm, stream, feats, qfe.Config(quick=True), CPU)
    assert set(costs) == {"B2", "P"}
    assert all(set(c) == {"mem_mib", "fwd_bwd_ms", "step_ms"} and min(c.values()) > 0
               for c in costs.values())
    for v, m in models.items():
        assert all(torch.equal(before[v][k], t) for k, t in m.state_dict().items())
        assert all(p.grad is None for p in m.parameters())


def test_generate_matches_teacher_forced_argmax():
    """Greedy decoding == argmax of the teacher-forced decoder on its own output, up to the first
    <eos>; Bridge.answer is its first step."""
    torch.manual_seed(0)
    cfg = qfe.Config(**UNIT)
    lm = t5lm.T5LM(V, cfg).eval()
    mem, keep = torch.randn(2, 5, cfg.d_model), torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    out = lm.generate(mem, keep, bos=1, eos=2, max_new=6)
    y = torch.cat([torch.ones(2, 1, dtype=torch.long), out], 1)
    with torch.no_grad():
        pred = lm.decode(mem, keep, y[:, :-1]).argmax(-1)
    for b in range(2):
        n = (out[b] == 2).nonzero()[0, 0].item() + 1 if (out[b] == 2).any() else out.shape[1]
        assert torch.equal(pred[b, :n], out[b, :n])
    lm, model, img = tiny_bridge("P")
    mem, keep = model.memory(lm, img, PROMPTS)
    first = lm.generate(mem, keep, model.vocab["<bos>"], model.vocab["<eos>"], 1)[:, 0]
    assert torch.equal(model.answer(lm, img, PROMPTS), first)


# --------------------------------------------------------------------------------------------------
# The convergence summary
# --------------------------------------------------------------------------------------------------

def test_binding_score_is_the_mean_over_binding_types():
    """count is answerable from a bag of words, so it is left out; no binding type at all -> None.
    """
    assert set(BINDING_TYPES) == set(QUESTION_TYPES) - {"count"}
    per_type = dict(colour=1.0, shape=0.5, position=0.0, count=1.0, exist=0.5)
    assert qfe.binding_score(per_type) == pytest.approx(0.5)
    assert qfe.binding_score(dict(count=1.0, other=1.0)) is None


def fake_run(variant, scores, stage1_samples=0, stage1_s=0.0, mem=1.0, ms=1.0):
    curve = [dict(step=i + 1, samples=10 * (i + 1), train_s=float(i + 1), binding_score=s, vqa=0.0)
             for i, s in enumerate(scores)]
    return dict(variant=variant, seed=0, curve=curve, stage1_samples=stage1_samples,
                stage1_s=stage1_s, mem_mib=mem, fwd_bwd_ms=ms, binding_score=scores[-1])


def test_to_target_and_summarise():
    """Target = 0.9 x the best final binding score (reached at exactly 0.9 too); B1's stage 1
    samples and seconds count; a variant that never reaches it gets None; --target-em replaces the
    default target."""
    runs = [fake_run("B1", [0.2, 0.9, 0.9], stage1_samples=100, stage1_s=5.0, mem=3.0, ms=3.0),
            fake_run("B2", [None, 0.5, 1.0], mem=4.0, ms=8.0),
            fake_run("P", [0.95, 0.95, 0.96], mem=1.0, ms=2.0),
            fake_run("C0", [0.1, 0.1, 0.1])]
    assert qfe.to_target(runs[3], 0.5) == (None, None)
    s = qfe.summarise(runs, qfe.Config())["0"]
    assert s["target"] == pytest.approx(0.9)
    got = {r["variant"]: (r["samples_to_target"], r["seconds_to_target"]) for r in runs}
    assert got == {"B1": (120, 7.0), "B2": (30, 3.0), "P": (10, 1.0), "C0": (None, None)}
    assert s["P_over_B2_samples_to_target"] == pytest.approx(1 / 3)
    assert s["P_over_B2_seconds_to_target"] == pytest.approx(1 / 3)
    assert s["P_over_B2_step_time"] == pytest.approx(0.25)
    assert s["P_over_B2_memory"] == pytest.approx(0.25)
    assert s["B1_over_B2_seconds_to_target"] == pytest.approx(7 / 3)
    assert s["B1_minus_B2_binding"] == pytest.approx(-0.1)
    s = qfe.summarise(runs, qfe.Config(target_em=0.5))["0"]
    assert s["target"] == 0.5
    assert runs[1]["samples_to_target"] == 20 and runs[0]["samples_to_target"] == 120


# --------------------------------------------------------------------------------------------------
# main(): the smoke run, its printout, the rerun, checkpoints
# --------------------------------------------------------------------------------------------------

def fail(*a, **k):
    pytest.fail("trained something it should have loaded or never reached")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every variant on the TINY config, then the same command again (backbones from the cache). The
    LM gets 300 steps (~2 s) so that answers and captions are not all empty: the rerun comparison
    then means something."""
    root = tmp_path_factory.mktemp("smoke")
    out, cache = root / "out", root / "cache"
    args = argv(out, cache, variants=",".join(qfe.VARIANTS), lm_steps=300)
    printed = []
    for k in range(2):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.MonkeyPatch.context() as mp:
            if k:
                mp.setattr(vision, "pretrain", fail)
                mp.setattr(t5lm, "pretrain", fail)
            res = qfe.main(args)
        printed.append((buf.getvalue(), res))
    return SimpleNamespace(out=out, cache=cache, stdout=printed[0][0], first=printed[0][1],
                           stdout2=printed[1][0], second=printed[1][1])


def test_smoke_results_cover_every_variant(smoke):
    """results.json: the gates, baselines, one run per variant with its curve, costs and caption
    scores, the summary; B1 alone has a stage 1; only the cached-prompt variants encode prompts."""
    res = json.loads((smoke.out / "results.json").read_text())
    assert set(res) == {"config", "baselines", "gates", "runs", "summary", "wall_s"}
    assert res == json.loads(json.dumps(smoke.second))
    assert set(res["gates"]) == {"0"}
    assert set(res["gates"]["0"]["lm_text_ceiling"]) == set(QUESTION_TYPES)
    assert all(0 <= v <= 1 for v in res["gates"]["0"]["lm_text_ceiling"].values())
    assert all(r["backbone_seed"] == 0 for r in res["runs"])
    assert set(res["baselines"]) == {"test", "holdout"}
    assert [r["variant"] for r in res["runs"]] == list(qfe.VARIANTS)
    assert {r["seed"] for r in res["runs"]} == {0}
    bs = TINY["batch_size"]
    for r in res["runs"]:
        for k in ("vqa", "binding_score", "per_type", "holdout", "bleu4", "cider",
                  "samples_to_target", "seconds_to_target", "step_ms", "mem_mib", "fwd_bwd_ms",
                  "curve", "stage1_samples"):
            assert k in r, (r["variant"], k)
        assert set(r["per_type"]) == set(QUESTION_TYPES) and 0 <= r["vqa"] <= 1
        assert r["step_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["mem_mib"] > 0
        assert [(c["step"], c["samples"]) for c in r["curve"]] == [(k, k * bs) for k in (1, 2, 3)]
        for c in r["curve"]:
            assert set(c) == {"step", "samples", "train_s", "vqa", "binding_score", "per_type"}
            assert c["binding_score"] == pytest.approx(qfe.binding_score(c["per_type"]))
        assert ((r["samples_to_target"], r["seconds_to_target"])
                == qfe.to_target(r, res["summary"]["0"]["target"]))
        assert r["stage1_samples"] == (TINY["stage1_steps"] * bs if r["variant"] == "B1" else 0)
        assert ("itc_r1" in r) == (r["variant"] == "B1")
        assert r["at_or_below_oracle"] == qfe.at_or_below_oracle(
            dict(vqa=r["vqa"], binding_score=r["binding_score"], **r["per_type"]),
            res["baselines"]["test"]["bag_oracle"])
        assert (r["prompts_encoded"] > 0) == (r["variant"] in ("P", "P-a", "P-b", "C0"))
    best = max(r["curve"][-1]["binding_score"] for r in res["runs"])
    assert best > 0 and res["summary"]["0"]["target"] == pytest.approx(0.9 * best)
    for k in ("P_over_B2_samples_to_target", "P_over_B2_step_time", "P_over_B2_memory",
              "B1_over_B2_seconds_to_target"):
        assert k in res["summary"]["0"]
    assert any(r["bleu4"] > 0 or r["cider"] > 0 for r in res["runs"])    # the LM says something


def rows_after(lines, header, n):
    i = next(k for k, line in enumerate(lines) if line.startswith(header))
    return [line.split() for line in lines[i + 2:i + 2 + n]], lines[i + 1]


def test_rows_at_or_below_the_bag_of_words_oracle_are_named():
    """at_or_below_oracle: the keys (VQA, binding score, question types) where a bridge is not
    above the oracle; none without an oracle (--data-dir)."""
    oracle = dict(overall=0.6, colour=0.5, shape=0.5, position=0.4, count=1.0, exist=0.7)
    scores = dict(vqa=0.6, binding_score=0.9, colour=0.9, shape=0.5, position=0.9, count=1.0,
                  exist=0.71)
    assert qfe.at_or_below_oracle(scores, oracle) == ["vqa", "shape", "count"]
    assert qfe.at_or_below_oracle(scores, None) == []


def test_smoke_prints_every_section(smoke):
    """The printout: gates, one line per run, the test table (whose numbers are the results'), the
    baselines, the cost table, the learning curve, every claim in the summary, and where the results
    went."""
    out, res = smoke.stdout, smoke.first
    lines, variants = out.splitlines(), list(qfe.VARIANTS)
    assert "vision encoder: minimal pairs" in out and "frozen LM: pretrained" in out
    assert "frozen LM text ceiling (true caption as context; gate >= 0.95 per type): colour" in out
    assert "B1 stage 1:" in out
    for v in variants:
        assert f"  {v} seed 0: VQA " in out
    rows, cols = rows_after(lines, "test set, mean ± sample std over seeds", len(variants) + 2)
    assert cols.split()[:2] == ["VQA", "binding"] and cols.split()[-1] == "CIDEr"
    assert [r[0] for r in rows] == variants + ["blind_prior", "bag_oracle"]
    for row, r in zip(rows, res["runs"]):
        assert [c.rstrip("*") for c in row[1:3]] == [f"{r['vqa']:.3f}", f"{r['binding_score']:.3f}"]
        assert len(row) == 11 and ("*" in row[1]) == ("vqa" in r["at_or_below_oracle"])
    rows, cols = rows_after(lines, "cost (target:", len(variants))
    assert [r[0] for r in rows] == variants and "samples to target" in cols and "memory MiB" in cols
    rows, cols = rows_after(lines, "validation binding score against samples seen", len(variants))
    assert [r[0] for r in rows] == variants
    assert cols.split() == ["samples"] + [str(c["samples"]) for c in res["runs"][0]["curve"]]
    assert "the claims (per-seed ratios" in out
    for k in res["summary"]["0"]:
        if k != "target":                                    # every claim, labelled, with its value
            assert any(line.startswith(f"  {qfe.CLAIMS[k]}") for line in lines), k
    assert "B1 stage 1 ITC image->text R@1: " in out
    assert lines[-1].startswith(f"results: {smoke.out / 'results.json'} (")


def test_smoke_logs_metrics_of_every_training_loop(smoke):
    """metrics.jsonl: the losses of every training loop under a name that tells variants and seeds
    apart, and each validation point of the learning curves as the run measured it (the rerun
    appends its own lines)."""
    recs = [json.loads(line) for line in (smoke.out / "metrics.jsonl").read_text().splitlines()]
    names = [r["run"] for r in recs if "loss" in r]
    want = {"vision", "T5 LM", "B1 seed 0 stage 1"} | {f"{v} seed 0" for v in qfe.VARIANTS}
    assert want <= set(names)
    starts = [r["run"] for r in recs if r.get("step") == 1 and "loss" in r]
    assert starts.count("vision") == starts.count("T5 LM") == 1     # the rerun loads both backbones
    assert starts.count("P seed 0") == 2                            # and trains every variant again
    for r in smoke.first["runs"]:
        val = [x for x in recs if x["run"] == f"{r['variant']} seed 0" and x.get("split") == "val"]
        first = val[:len(r["curve"])]                                   # the first run's points
        assert ([(x["step"], x["binding_score"]) for x in first]
                == [(c["step"], c["binding_score"]) for c in r["curve"]])


def test_figures_without_matplotlib_are_none(monkeypatch, tmp_path):
    """matplotlib is optional: without it (pyplot() gives None) no PNG is written and none is named.
    """
    monkeypatch.setattr(qfe, "pyplot", lambda: None)
    assert qfe.figures(qfe.Config(out=str(tmp_path)), {}, [], {}) == []
    assert not list(tmp_path.iterdir())


def test_smoke_writes_and_names_the_figures(smoke):
    pytest.importorskip("matplotlib")
    for name in ("scenes.png", "binding_vs_compute.png"):
        assert f"figure: {smoke.out / name}" in smoke.stdout
        assert (smoke.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_keeps_earlier_results_and_repeats_the_numbers(smoke):
    """The second run loads both backbones (pretraining is patched to fail), moves the first run's
    results and checkpoints to previous_1/, and, on CPU with the same seed, gives the same numbers
    and the same weights."""
    assert f"earlier results moved to {smoke.out / 'previous_1'}" in smoke.stdout2
    assert "vision encoder: loaded" in smoke.stdout2 and "frozen LM: loaded" in smoke.stdout2
    prev = smoke.out / "previous_1"
    want = ["results.json"] + [f"bridge_{v}_seed0.pt" for v in qfe.VARIANTS]
    want += [] if qfe.pyplot() is None else ["binding_vs_compute.png", "scenes.png"]  # figures too
    assert sorted(p.name for p in prev.iterdir()) == sorted(want)
    assert json.loads((prev / "results.json").read_text()) == json.loads(json.dumps(smoke.first))
    a, b = smoke.first, smoke.second
    assert a["gates"] == b["gates"] and a["baselines"] == b["baselines"]
    assert a["summary"]["0"]["target"] == b["summary"]["0"]["target"]
    keys = ("variant", "vqa", "binding_score", "per_type", "holdout", "bleu4", "cider", "examples",
            "samples_to_target", "stage1_samples", "itc_r1", "prompts_encoded", "mem_mib")
    curve_keys = ("step", "samples", "vqa", "binding_score", "per_type")    # not train_s: wall time
    for r1, r2 in zip(a["runs"], b["runs"]):
        assert {k: r1.get(k) for k in keys} == {k: r2.get(k) for k in keys}
        assert ([[c[k] for k in curve_keys] for c in r1["curve"]]
                == [[c[k] for k in curve_keys] for c in r2["curve"]])
    for v in qfe.VARIANTS:
        m1 = torch.load(prev / f"bridge_{v}_seed0.pt", weights_only=True)["model"]
        m2 = torch.load(smoke.out / f"bridge_{v}_seed0.pt", weights_only=True)["model"]
        assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1), v


def test_checkpoint_loads_weights_only_and_reproduces_the_run(smoke, monkeypatch):
    """bridge_P_seed0.pt: plain data (weights_only=True) with the Bridge's weights (not the frozen
    LM's, not the fixed image positions), its config and vocabulary; a fresh Bridge built from that
    config takes the weights strictly and, with the cached backbones, gives the reported test
    answers and captions."""
    monkeypatch.setattr(vision, "pretrain", fail)
    monkeypatch.setattr(t5lm, "pretrain", fail)
    ck = torch.load(smoke.out / "bridge_P_seed0.pt", weights_only=True)
    assert set(ck) == {"model", "config", "vocab", "max_len"}
    assert ck["config"] == smoke.second["config"]
    assert not any(k.startswith("lm") for k in ck["model"]) and "qf.img_pos" not in ck["model"]
    cfg = qfe.Config(**ck["config"])
    world, vocab, refs = qfe.load_data(cfg)
    assert vocab == ck["vocab"]
    with contextlib.redirect_stdout(io.StringIO()):
        lm = t5lm.load_or_pretrain(world, vocab, cfg, CPU).requires_grad_(False)
        vit, _, _ = vision.load_or_pretrain(vision.config_for(cfg), cfg.cache_dir, CPU)
    qf = qfe.QFormer(len(vocab), cfg, max_len=ck["max_len"])
    bridge = qfe.Bridge(qf, "P", vocab, cfg)
    bridge.load_state_dict(ck["model"])
    feats = vision.tokens(vit, world["test"]["images"], int(math.isqrt(cfg.image_tokens)), CPU)
    run = next(r for r in smoke.second["runs"] if r["variant"] == "P")
    em, per_type = qfe.vqa(bridge, lm, feats, qfe.vqa_items(world["test"]), vocab, CPU)
    assert (em, per_type) == (run["vqa"], run["per_type"])
    max_new = max(len(r[0].split()) for r in refs["test"]) + 2
    # as in the run: 'caption:' cached in a batch
    bridge.cache(lm, [qfe.CAPTION_PROMPT, qfe.qa_prompt("x")])
    assert bridge.generate(lm, feats[:3], [qfe.CAPTION_PROMPT] * 3, max_new) == run["examples"]


def test_quick_switches_the_defaults_and_explicit_flags_win(tmp_path):
    """--quick sets every QUICK value; a flag given with it still wins; without it the defaults are
    Config()'s. (parse: main's first step.)"""
    cfg = qfe.parse(["--quick"])
    assert cfg.quick and all(getattr(cfg, k) == v for k, v in qfe.QUICK.items())
    cfg = qfe.parse(["--quick", "--steps", "7", "--out", str(tmp_path)])
    assert cfg.steps == 7 and cfg.out == str(tmp_path) and cfg.n_train == qfe.QUICK["n_train"]
    assert qfe.parse([]) == qfe.Config()


@pytest.mark.parametrize("vision_passes", [False, True])
def test_a_failed_gate_stops_before_any_bridge_trains(vision_passes, tmp_path, capsys, monkeypatch):
    """Backbones of TINY size fail their gates (the ViT's minimal pairs; with the ViT's gate lowered
    to 0, the LM's text ceiling): the run says so in one line on stderr and exits 3 before any
    bridge trains."""
    monkeypatch.setattr(qfe, "train_variant", fail)
    if vision_passes:
        monkeypatch.setattr(vision, "GATE", 0.0)
    with pytest.raises(SystemExit) as e:
        qfe.main(argv(tmp_path / "out", tmp_path / "cache", ignore_gates=False))
    out, err = capsys.readouterr()
    assert e.value.code == 3 and len(err.strip().splitlines()) == 1 and "stopped" in err
    assert ("frozen LM text ceiling" in err) == vision_passes and ("-> FAIL" in out)


def test_quick_reports_a_failed_gate_and_goes_on(tmp_path, capsys):
    """--quick's tiny backbones cannot pass: the gate line says FAIL, and the bridges train."""
    res = qfe.main(argv(tmp_path / "out", tmp_path / "cache", ignore_gates=False, variants="P")
                   + ["--quick"])
    assert "-> FAIL" in capsys.readouterr().out and [r["variant"] for r in res["runs"]] == ["P"]


def test_vary_backbones_redraws_the_world_and_both_backbones(tmp_path, monkeypatch):
    """--vary-backbones: seed s trains on the world's training scenes of seed s, a ViT and an LM of
    seed s (each gated); without it every seed shares the seed-0 backbones (built once)."""
    built = []
    for mod in (vision, t5lm):
        def spy(*a, _o=mod.load_or_pretrain, _m=mod.__name__, **k):
            built.append((_m, k["seed"]))
            return _o(*a, **k)
        monkeypatch.setattr(mod, "load_or_pretrain", spy)
    orig_stream = qfe.stage2_stream
    firsts = []
    monkeypatch.setattr(qfe, "stage2_stream", lambda ds, cfg, seed: firsts.append(ds["captions"][0])
                        or orig_stream(ds, cfg, seed))
    with contextlib.redirect_stdout(io.StringIO()):
        res = qfe.main(argv(tmp_path / "out", tmp_path / "cache", variants="P", seeds="0,1",
                            vary_backbones=True))
    assert [r["backbone_seed"] for r in res["runs"]] == [0, 1] and set(res["gates"]) == {"0", "1"}
    assert sorted(built) == [("data.t5lm", 0), ("data.t5lm", 1), ("data.vision", 0),
                             ("data.vision", 1)]
    assert firsts[0] != firsts[1]
    built.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        res = qfe.main(argv(tmp_path / "out2", tmp_path / "cache2", variants="P", seeds="0,1"))
    assert [r["backbone_seed"] for r in res["runs"]] == [0, 0] and set(res["gates"]) == {"0"}
    assert sorted(built) == [("data.t5lm", 0), ("data.vision", 0)]


def test_main_reads_a_data_dir(tmp_path):
    """--data-dir: splits from the file, no hold-out split (so no hold-out score, no
    bag-of-attributes oracle)."""
    ds = generate(120, "train", seed=3, size=16)
    save_dir(ds, tmp_path / "data", ["train"] * 90 + ["val"] * 15 + ["test"] * 15)
    with contextlib.redirect_stdout(io.StringIO()):
        res = qfe.main(argv(tmp_path / "out", tmp_path / "cache", variants="B1,P",
                            data_dir=tmp_path / "data"))
    assert [r["variant"] for r in res["runs"]] == ["B1", "P"]
    assert all(r["holdout"] is None and 0 <= r["vqa"] <= 1 for r in res["runs"])
    assert set(res["baselines"]) == {"test"} and res["baselines"]["test"]["bag_oracle"] is None
    assert res["config"]["data_dir"] == str(tmp_path / "data")
    assert (tmp_path / "out" / "bridge_P_seed0.pt").exists()


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing trained, nothing overwritten
# --------------------------------------------------------------------------------------------------

def broken_dir(p):
    d = p / "broken"
    d.mkdir()
    np.save(d / "images.npy", np.zeros((4, 16, 16, 3), np.uint8))
    (d / "annotations.jsonl").write_text('{"caption": "a red circle"}\nnot json\n')
    return str(d)


BAD = [
    pytest.param(lambda p: ["--out", str(p / "f" / "out")], "--out", id="unwritable-out"),
    pytest.param(lambda p: ["--lr", "0"], "--lr must be positive", id="lr-0"),
    pytest.param(lambda p: ["--lr=-1"], "--lr must be positive", id="lr-negative"),
    pytest.param(lambda p: ["--lr", "nan"], "--lr must be positive", id="lr-nan"),
    pytest.param(lambda p: ["--lr", "inf"], "--lr must be positive and finite, got inf",
                 id="lr-inf"),
    pytest.param(lambda p: ["--device", "cuda"], "CUDA is not available", id="cuda-missing",
                 marks=pytest.mark.skipif(torch.cuda.is_available(),
                                          reason="this machine has CUDA")),
    pytest.param(lambda p: ["--target-em", "0"], "--target-em must be in (0, 1]", id="target-em-0"),
    pytest.param(lambda p: ["--target-em", "1.5"], "--target-em must be in (0, 1]",
                 id="target-em-1.5"),
    pytest.param(lambda p: ["--variants", "B1,Q9"], "unknown 'Q9'", id="unknown-variant"),
    pytest.param(lambda p: ["--variants", ","], "empty list", id="no-variant"),
    pytest.param(lambda p: ["--queries", "0"], "--queries must be positive", id="queries-0"),
    pytest.param(lambda p: ["--image-tokens", "5"], "--image-tokens", id="image-tokens-not-square"),
    pytest.param(lambda p: ["--image-tokens", "25"], "--image-tokens", id="image-tokens-over-grid"),
    pytest.param(lambda p: ["--seeds", "a"], "--seeds", id="seeds"),
    pytest.param(lambda p: ["--caption-frac", "2"], "--caption-frac must be in [0, 1]",
                 id="caption-frac-2"),
    pytest.param(lambda p: ["--data-dir", str(p / "no-such-dir")], "no such directory",
                 id="missing-data-dir"),
    pytest.param(lambda p: ["--data-dir", broken_dir(p)], "bad annotation line",
                 id="malformed-data-dir"),
    pytest.param(lambda p: ["--quer", "4"], "unrecognized arguments: --quer 4",
                 id="abbreviated-flag"),
    pytest.param(lambda p: ["--threads", "-1"], "--threads must be >= 0", id="threads-negative"),
    pytest.param(lambda p: ["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'",
                 id="unknown-dtype"),
    pytest.param(lambda p: ["--device", "tpu"], "argument --device: invalid choice: 'tpu'",
                 id="unknown-device"),
]


def bad_run(p, extra, capsys, monkeypatch):
    for mod, name in ((qfe, "train_variant"), (t5lm, "pretrain"), (vision, "pretrain")):
        monkeypatch.setattr(mod, name, fail)
    with pytest.raises(SystemExit) as e:                      # the last --out wins
        qfe.main(argv(p / "out", p / "cache") + extra)
    captured = capsys.readouterr()
    return e.value.code, captured.err


@pytest.mark.parametrize("make, msg", BAD)
def test_bad_input_exits_2_with_one_line_before_training(make, msg, tmp_path, capsys, monkeypatch):
    """Each user error: exit status 2, exactly one line on stderr naming the problem, no traceback,
    nothing trained (the training functions are patched to fail), no backbone written, and an
    earlier run's results in that --out untouched: byte for byte, nothing moved to previous_<k>/, no
    metrics.jsonl (even for an error caught only when the data is read)."""
    (tmp_path / "f").write_text("a file, not a folder")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    (out / "bridge_P_seed0.pt").write_bytes(b"earlier")
    code, err = bad_run(tmp_path, make(tmp_path), capsys, monkeypatch)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("qformer_efficient.py: error:"), err
    assert msg in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["bridge_P_seed0.pt", "results.json"]
    assert (out / "results.json").read_text() == '{"earlier": true}'
    assert (out / "bridge_P_seed0.pt").read_bytes() == b"earlier"
    assert len(list(tmp_path.rglob("results.json"))) == 1 and len(list(tmp_path.rglob("*.pt"))) == 1
    assert (tmp_path / "f").is_file()

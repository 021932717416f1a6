"""Q-Former: the three stage-1 masks, hard negatives, BLEU-4 / CIDEr by hand, the grounded variant's frozen
prompt encoder and its cache, and smoke runs of main() (including bad input)."""

import json
import math
import os

import numpy as np
import pytest
import torch

import qformer_efficient as qfe
from data.shapes import generate, save_dir

TINY = dict(n_train=160, n_eval=40, image_size=16, patch=4, vit_dim=16, vit_layers=2, image_tokens=16,
            clip_steps=3, d_model=32, enc_layers=1, dec_layers=1, n_head=2, max_len=48, lm_steps=3, queries=4,
            q_dim=32, q_layers=2, mlm_steps=2, stage1_steps=3, steps=4, batch_size=16, eval_every=2)
V = 40


def tiny_qformer(seed=0):
    torch.manual_seed(seed)
    cfg = qfe.Config(**TINY)
    return cfg, qfe.QFormer(V, cfg).double().eval()


def inputs(cfg, B=3, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, cfg.image_tokens, cfg.vit_dim, generator=g, dtype=torch.float64)
    ids = torch.randint(4, V, (B, T), generator=g)
    return img, ids


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------

def test_mask_matrices_by_hand():
    keep = torch.tensor([[True, True, False]])                      # 2 queries, 3 text positions, last padded
    q, t, x = True, True, False
    want = {
        "uni": [[q, q, x, x, x], [q, q, x, x, x], [x, x, t, t, x], [x, x, t, t, x], [x, x, t, t, x]],
        "bi": [[1, 1, 1, 1, 0]] * 5,
        "causal": [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]],
    }
    for kind, m in want.items():
        got = qfe.qformer_mask(2, keep, kind)
        assert got.shape == (1, 1, 5, 5)
        assert got[0, 0].tolist() == [[bool(v) for v in row] for row in m], kind
    with pytest.raises(ValueError):
        qfe.qformer_mask(2, keep, "diagonal")


def run_qf(qf, img, ids, kind):
    return qf(img, qf.embed_text(ids), torch.ones_like(ids, dtype=torch.bool), kind)


def test_itc_unimodal_mask_separates_queries_and_text():
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    ids2 = ids.clone()
    ids2[:, 2:] = (ids2[:, 2:] + 7) % (V - 4) + 4                    # other words
    z1, t1 = run_qf(qf, img, ids, "uni")
    z2, t2 = run_qf(qf, img, ids2, "uni")
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-12)           # queries never see the text
    _, t3 = run_qf(qf, img * 2 + 1, ids, "uni")
    torch.testing.assert_close(t1, t3, rtol=0, atol=1e-12)           # text never sees the image (via queries)
    assert (z1 - run_qf(qf, img * 2 + 1, ids, "uni")[0]).abs().max() > 1e-6


def test_itg_multimodal_causal_mask():
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    z1, t1 = run_qf(qf, img, ids, "causal")
    ids2 = ids.clone()
    ids2[:, 4:] = (ids2[:, 4:] + 5) % (V - 4) + 4                    # change text positions 4, 5
    z2, t2 = run_qf(qf, img, ids2, "causal")
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-12)           # queries see no text
    torch.testing.assert_close(t1[:, :4], t2[:, :4], rtol=0, atol=1e-12)   # position t sees no text after t
    assert (t1[:, 4:] - t2[:, 4:]).abs().max() > 1e-6
    _, t3 = run_qf(qf, img * 2 + 1, ids, "causal")                   # ... but every text position sees the queries,
    assert ((t1 - t3).abs().amax(-1) > 1e-9).all()                   # so the image reaches all of them through them


def test_itg_image_reaches_text_only_through_queries():
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    x = torch.cat([qf.queries.expand(len(ids), -1, -1), qf.embed_text(ids)], 1)
    n_q = cfg.queries
    mask = qfe.qformer_mask(n_q, torch.ones_like(ids, dtype=torch.bool), "causal")
    seen = []
    for layer in qf.layers:                                          # record what each cross-attention is asked
        if layer.cross is not None:
            layer.cross.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    for layer in qf.layers:
        x = layer(x, n_q, mask, qf.img_norm(img))
    assert seen and all(s == n_q for s in seen)                      # only the query rows cross-attend


def test_itm_bidirectional_full_visibility():
    cfg, qf = tiny_qformer()
    img, ids = inputs(cfg)
    assert qfe.qformer_mask(cfg.queries, torch.ones(2, 5, dtype=torch.bool), "bi").all()
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 3) % (V - 4) + 4
    z1, t1 = run_qf(qf, img, ids, "bi")
    z2, t2 = run_qf(qf, img, ids2, "bi")
    assert ((z1 - z2).abs().amax((1, 2)) > 1e-6).all()               # queries see the last word
    assert ((t1[:, 0] - t2[:, 0]).abs().amax(-1) > 1e-6).all()       # and so does the first text position


def test_padding_is_never_attended():
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


# ----------------------------------------------------------------------------------------------------
# Stage 1 pieces
# ----------------------------------------------------------------------------------------------------

def test_itc_similarity_is_max_over_queries():
    torch.manual_seed(0)
    heads = qfe.Stage1Heads(8, dim=4).double()
    z, t = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        sim = qfe.itc_similarity(heads, z, t)
        zi = torch.nn.functional.normalize(heads.img_proj(z), dim=-1)
        zt = torch.nn.functional.normalize(heads.txt_proj(t), dim=-1)
    for i in range(3):
        for j in range(4):
            assert abs(sim[i, j].item() - max(float(zi[i, k] @ zt[j]) for k in range(5))) < 1e-12


def test_hard_negatives_never_pick_a_positive():
    g = torch.Generator().manual_seed(0)
    B = 12
    same = torch.eye(B, dtype=torch.bool)
    same[2, 5] = same[5, 2] = True                                   # an identical caption is a positive too
    for _ in range(200):
        sim = torch.randn(B, B, generator=g) * 5
        sim[torch.arange(B), torch.arange(B)] = 50                   # the positive is by far the most similar
        sim[2, 5] = 50
        idx = qfe.hard_negatives(sim, same, g)
        assert not same[torch.arange(B), idx].any()


def test_hard_negatives_follow_similarity():
    g = torch.Generator().manual_seed(1)
    B = 6
    sim = torch.zeros(B, B)
    sim[:, 3] = 8.0                                                  # column 3 is the hardest negative for most rows
    idx = torch.stack([qfe.hard_negatives(sim, torch.eye(B, dtype=torch.bool), g) for _ in range(300)])
    share = (idx[:, [0, 1, 2, 4, 5]] == 3).float().mean().item()
    assert share > 0.95                                              # softmax(8) vs 4 others at 0: ~0.9987
    assert (idx[:, 3] != 3).all()


def test_hard_negatives_row_without_negatives_falls_back():
    g = torch.Generator().manual_seed(0)
    same = torch.ones(3, 3, dtype=torch.bool)                        # every caption identical
    idx = qfe.hard_negatives(torch.zeros(3, 3), same, g)
    assert (idx != torch.arange(3)).all()


def test_stage1_loss_trains_the_qformer():
    cfg, qf = tiny_qformer()
    qf = qf.float().train()
    heads = qfe.Stage1Heads(cfg.q_dim)
    vocab = {"<pad>": 0, "<cls>": 1, "<dec>": 2, "<eos>": 3}
    img = torch.randn(4, cfg.image_tokens, cfg.vit_dim)
    caps = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [5, 6, 7, 0], [10, 11, 12, 13]])   # rows 0 and 2 identical
    loss, parts = qfe.stage1_loss(qf, heads, img, caps, 0, vocab, torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item()) and set(parts) == {"itc", "itm", "itg"}
    loss.backward()
    assert qf.queries.grad.abs().sum() > 0 and heads.temp.grad is not None and heads.itm.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# BLEU-4 and CIDEr against hand-computed values
# ----------------------------------------------------------------------------------------------------

def test_bleu_identical_is_one():
    assert qfe.bleu4(["a red circle at the top"], [["a red circle at the top"]]) == pytest.approx(1.0)


def test_bleu_hand_computed_precisions():
    # p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2; same length, BP = 1
    got = qfe.bleu4(["a b c d e"], [["a b c d f"]])
    assert got == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_bleu_brevity_penalty_and_closest_reference():
    # every n-gram matches; c = 6, closest reference length 7 (not 12): BP = exp(1 - 7/6)
    got = qfe.bleu4(["the cat sat on the mat"], [["the cat sat on the mat today", "x " * 11 + "x"]])
    assert got == pytest.approx(math.exp(1 - 7 / 6))


def test_bleu_clips_counts_and_is_zero_without_4gram_match():
    assert qfe.bleu4(["the the the the"], [["the cat"]]) == 0.0       # p1 = 1/4 after clipping; p2 = 0
    # clipping: "a a a b c d" vs "a b c d e f": p1 = (1+1+1+1)/6 (only one 'a' counts)
    h, r = "a a a b c d", "a b c d e f"
    want = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert qfe.bleu4([h], [[r]]) == pytest.approx(want)


def test_bleu_is_corpus_level():
    # sentence 1: 5 words, p = 4/5, 3/4, 2/3, 1/2; sentence 2: identical 5 words, p = 5/5, 4/4, 3/3, 2/2
    got = qfe.bleu4(["a b c d e", "v w x y z"], [["a b c d f"], ["v w x y z"]])
    assert got == pytest.approx((9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25)


def test_cider_style():
    refs = [["a red circle at top"], ["a blue square at left"], ["two green crosses in the center"]]
    hyps = ["a red circle at top", "a blue square at left", "two green crosses in the center"]
    assert qfe.cider(hyps, refs) == pytest.approx(10.0)
    # 3-word sentences have no 4-grams: the n = 4 term is 0, as in CIDEr
    assert qfe.cider(["a red circle"], [["a red circle"]] * 1 + []) == 0.0          # one document: every idf is 0
    assert qfe.cider(["a red circle", "two blue squares"], [["a red circle"], ["two blue squares"]]) == pytest.approx(7.5)
    assert qfe.cider(["zzz", "yyy", "xxx"], refs) == 0.0
    part = qfe.cider(["a red square at left", "a blue square at left", "two green crosses in the center"], refs)
    assert 0 < part < 10


# ----------------------------------------------------------------------------------------------------
# The grounded variant: frozen, cached prompt encoder
# ----------------------------------------------------------------------------------------------------

def tiny_bridge(variant):
    torch.manual_seed(0)
    cfg = qfe.Config(**TINY)
    words = "<pad> <bos> <eos> <unk> <cls> <dec> <mask> question: caption: what colour is the circle square ? red".split()
    vocab = {w: i for i, w in enumerate(words)}
    lm = qfe.T5LM(len(vocab), cfg)
    model = qfe.Bridge(qfe.QFormer(len(vocab), cfg), lm, variant, vocab, cfg, torch.device("cpu"))
    img = torch.randn(3, cfg.image_tokens, cfg.vit_dim)
    prompts = ["question: what colour is the circle ?", "question: what colour is the square ?", "caption:"]
    return lm, model, img, prompts


@pytest.mark.parametrize("variant", ["P", "P-a", "C0"])
def test_no_gradient_reaches_the_frozen_lm_encoder(variant):
    lm, model, img, prompts = tiny_bridge(variant)
    model.loss(img, prompts, ["red", "red", "a red circle"]).backward()   # LM left requires_grad=True on purpose
    enc = [p for n, p in lm.named_parameters() if n.startswith(("enc.", "norm_enc", "pos_enc"))]
    assert all(p.grad is None for p in enc)
    assert lm.dec[0].cross.q.weight.grad is not None                      # the decoder is in the graph
    assert model.qf.queries.grad.abs().sum() > 0 and model.out_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["B2", "P-b"])
def test_prefix_variants_do_backpropagate_through_the_encoder(variant):
    # the contrast that keeps the test above honest
    lm, model, img, prompts = tiny_bridge(variant)
    model.loss(img, prompts, ["red", "red", "a red circle"]).backward()
    assert lm.enc[0].attn.q.weight.grad.abs().sum() > 0


def test_prompt_encoded_once_per_prompt(monkeypatch):
    lm, model, img, prompts = tiny_bridge("P")
    calls = []
    orig = lm.encode
    monkeypatch.setattr(lm, "encode", lambda *a, **k: calls.append(a[0].shape[0]) or orig(*a, **k))
    model.loss(img, prompts, ["red", "red", "a"])
    model.loss(img, prompts[::-1], ["a", "red", "red"])               # same prompts again: no new encoding
    model.loss(img[:2], [prompts[0], prompts[0]], ["red", "red"])
    assert model.cache.computed == 3 and calls == [3]
    model.loss(img[:1], ["question: what colour is the square square ?"], ["red"])
    assert model.cache.computed == 4 and calls == [3, 1]


def test_cached_prompt_equals_encoding_it_alone():
    lm, model, img, prompts = tiny_bridge("P")
    h, keep = model.cache(prompts)
    for j, p in enumerate(prompts):
        ids = torch.tensor([qfe.encode(model.vocab, p, bos=False)])
        alone = lm.encode_ids(ids, model.vocab["<pad>"])[0]
        n = int(keep[j].sum())
        assert n == ids.shape[1]
        torch.testing.assert_close(h[j, :n], alone, rtol=1e-5, atol=1e-5)


def test_p_memory_is_queries_then_encoded_prompt():
    lm, model, img, prompts = tiny_bridge("P")
    mem, keep = model.memory(img, prompts)
    h, kp = model.cache(prompts)
    z, _ = model.qf(img, model.in_proj(h), kp, "bi")
    torch.testing.assert_close(mem, torch.cat([model.out_proj(z), h], 1))
    assert keep[:, : z.shape[1]].all()


def test_c0_ignores_the_image():
    lm, model, img, prompts = tiny_bridge("C0")
    torch.testing.assert_close(model.memory(img, prompts)[0], model.memory(img * 3 + 1, prompts)[0])


def test_generate_matches_teacher_forced_argmax():
    torch.manual_seed(0)
    cfg = qfe.Config(**TINY)
    lm = qfe.T5LM(V, cfg).eval()
    mem, keep = torch.randn(2, 5, cfg.d_model), torch.ones(2, 5, dtype=torch.bool)
    out = lm.generate(mem, keep, bos=1, eos=2, max_new=6)
    y = torch.cat([torch.ones(2, 1, dtype=torch.long), out], 1)
    with torch.no_grad():
        pred = lm.decode(mem, keep, y[:, :-1]).argmax(-1)
    for b in range(2):                                               # up to and including the first <eos>
        n = (out[b] == 2).nonzero()[0, 0].item() + 1 if (out[b] == 2).any() else out.shape[1]
        assert torch.equal(pred[b, :n], out[b, :n])


# ----------------------------------------------------------------------------------------------------
# main(): smoke runs and bad input
# ----------------------------------------------------------------------------------------------------

def tiny_argv(out, **kw):
    args = dict(TINY, **kw)
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))] + ["--out", str(out)]


def test_main_smoke_all_variants(tmp_path):
    runs, summary = qfe.main(tiny_argv(tmp_path, variants="B1,B2,P,P-a,P-b,C0"))
    res = json.load(open(tmp_path / "results.json"))
    assert [r["variant"] for r in res["runs"]] == ["B1", "B2", "P", "P-a", "P-b", "C0"]
    for r in res["runs"]:
        for k in ("bleu4", "cider", "vqa_em", "holdout_em", "step_ms", "mem_mib", "curve", "vqa_per_type"):
            assert k in r, k
        assert r["curve"][-1]["samples"] == TINY["steps"] * TINY["batch_size"]
    b1 = res["runs"][0]
    assert "itc_r1" in b1 and b1["stage1_samples"] == TINY["stage1_steps"] * TINY["batch_size"]
    p = res["runs"][2]
    world, _, _ = qfe.load_data(qfe.Config(**TINY))                  # each distinct prompt encoded once, at most
    distinct = {qfe.qa_prompt(d["q"]) for ds in world.values() for qa in ds["qa"] for d in qa} | {qfe.CAPTION_PROMPT}
    assert 0 < p["prompts_encoded"] <= len(distinct)
    assert "P_step_over_B2_step" in res["summary"]["0"]
    assert os.path.exists(tmp_path / "bridge_P_seed0.pt")
    assert res["backbones"]["lm_text_qa_em"] >= 0
    # rerun: backbones from the cache, same numbers (deterministic on CPU)
    runs2, _ = qfe.main(tiny_argv(tmp_path, variants="P"))
    assert runs2[0]["vqa_em"] == p["vqa_em"] and runs2[0]["curve"][-1]["val_em"] == p["curve"][-1]["val_em"]
    assert runs2[0]["bleu4"] == p["bleu4"]


def test_main_one_step_run(tmp_path):
    runs, summary = qfe.main(tiny_argv(tmp_path, variants="B2,P", steps=1))   # no step-time median exists
    assert [r["step_ms"] for r in runs] == [None, None] and runs[1]["fwd_bwd_ms"] > 0


def test_main_reads_a_data_dir(tmp_path):
    ds = generate(120, "train", seed=3, size=16)
    splits = ["train"] * 90 + ["val"] * 15 + ["test"] * 15
    save_dir(ds, tmp_path / "data", splits)
    runs, _ = qfe.main(tiny_argv(tmp_path / "out", variants="P", data_dir=tmp_path / "data"))
    assert len(runs) == 1 and 0 <= runs[0]["vqa_em"] <= 1


@pytest.mark.parametrize("bad, msg", [
    (dict(variants="B1,Q9"), "unknown 'Q9'"),
    (dict(queries=0), "--queries must be at least 1"),
    (dict(qformer_init="bert"), "--qformer-init"),
    (dict(data_dir="MISSING"), "no such directory"),
    (dict(quer=4), "unrecognized arguments: --quer"),                    # no abbreviations
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, bad, msg):
    if bad.get("data_dir") == "MISSING":
        bad = dict(data_dir=tmp_path / "no-such-dir")
    with pytest.raises(SystemExit) as e:
        qfe.main(tiny_argv(tmp_path, **bad))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qformer_efficient.py: error:") and msg in err and "\n" not in err


def test_malformed_data_dir_exits_2(tmp_path, capsys):
    d = tmp_path / "broken"
    d.mkdir()
    np.save(d / "images.npy", np.zeros((4, 16, 16, 3), np.uint8))
    (d / "annotations.jsonl").write_text('{"caption": "a red circle"}\nnot json\n')
    with pytest.raises(SystemExit) as e:
        qfe.main(tiny_argv(tmp_path / "out", data_dir=d))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qformer_efficient.py: error:") and "\n" not in err

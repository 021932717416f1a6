"""DeepInsert: the efficient splice against a masked reference, the KV cache, FLOPs, alignment metrics."""

import json
import os

import pytest
import torch

import multimodal_align as mma

TINY = dict(d_model=32, n_layer=4, n_head=2, vit_dim=16, vit_layers=2, image_tokens=4, image_size=16, patch=4)


def tiny_bridge(seed=0, V=30):
    torch.manual_seed(seed)
    cfg = mma.Config(**TINY)
    model = mma.Bridge(mma.LM(V, cfg), cfg).double().eval()
    feats = torch.randn(3, cfg.image_tokens, cfg.vit_dim, dtype=torch.float64)
    ids = torch.randint(4, V, (3, 7))
    ids[:, 0] = 1                                                        # <bos>
    return cfg, model, feats, ids


@pytest.mark.parametrize("l", [0, 1, 2, 3])
def test_splice_equals_masked_reference(l):
    cfg, model, feats, ids = tiny_bridge()
    fast = model(feats, ids, l)
    slow = model.masked_reference(feats, ids, l)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)


def test_l0_equals_plain_llava_forward():
    cfg, model, feats, ids = tiny_bridge()
    lm = model.lm
    # plain LLaVA: [bos, image tokens, text] from the input embeddings, positions 0.., causal everywhere
    h = torch.cat([lm.emb(ids[:, :1]), model.proj(feats), lm.emb(ids[:, 1:])], 1)
    pos = torch.arange(h.shape[1])
    for blk in lm.blocks:
        h = blk(h, pos)
    M = feats.shape[1]
    want = lm.head(lm.norm(torch.cat([h[:, :1], h[:, 1 + M:]], 1)))
    torch.testing.assert_close(model(feats, ids, 0), want, atol=1e-10, rtol=1e-10)


def test_deeper_insertion_changes_the_output():
    # guards the two tests above against a splice that ignores l
    cfg, model, feats, ids = tiny_bridge()
    assert (model(feats, ids, 0) - model(feats, ids, 2)).abs().max() > 1e-6


@pytest.mark.parametrize("l", [0, 2, 3])
def test_cached_generation_equals_uncached(l):
    cfg, model, feats, ids = tiny_bridge(seed=1)
    fast = model.generate(feats, ids, l, max_new=6, use_cache=True)
    slow = model.generate(feats, ids, l, max_new=6, use_cache=False)
    assert torch.equal(fast, slow)


def test_early_layer_cache_holds_text_only():
    cfg, model, feats, ids = tiny_bridge()
    caches = [dict() for _ in model.lm.blocks]
    mma.deep_insert_blocks(model.lm.blocks, model.lm.emb(ids), model.proj(feats), 2, caches)
    T, M = ids.shape[1], feats.shape[1]
    assert [c["k"].shape[2] for c in caches] == [T, T, T + M, T + M]


def test_flop_formula_matches_counter():
    cfg, model, feats, ids = tiny_bridge()
    img = model.proj(feats[:1]).float()
    lm = model.lm.float()
    T, M, N, D = ids.shape[1], feats.shape[1], cfg.n_layer, cfg.d_model
    for l in range(N):
        counted = mma.counted_prefill_flops(lm, img, ids[:1], l)
        assert abs(counted - mma.prefill_flops(T, M, N, l, D, 4 * D)) <= 0.02 * counted
    # the saving is exactly l * [F(T+M) - F(T)]
    saved = mma.prefill_flops(T, M, N, 0, D, 4 * D) - mma.prefill_flops(T, M, N, 2, D, 4 * D)
    assert saved == 2 * (mma.layer_flops(T + M, D, 4 * D) - mma.layer_flops(T, D, 4 * D))


def test_mutual_knn_identical_and_independent():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 32, generator=g)
    assert mma.mutual_knn(a, a.clone(), 10) == pytest.approx(1.0)
    b = torch.randn(1024, 32, generator=g)
    chance = 10 / 1023
    assert abs(mma.mutual_knn(a, b, 10) - chance) < 0.01
    assert mma.linear_cka(a, a) == pytest.approx(1.0)
    assert mma.linear_cka(a, b) < 0.1


def test_smoke_main_writes_results(tmp_path):
    out = tmp_path / "out"
    args = ["--n-train", "64", "--n-eval", "24", "--clip-steps", "2", "--lm-steps", "2", "--stage1-steps", "1",
            "--stage2-steps", "2", "--batch-size", "8", "--d-model", "32", "--n-layer", "4", "--n-head", "2",
            "--vit-dim", "16", "--vit-layers", "2", "--image-tokens", "4", "--knn-k", "3", "--device", "cpu",
            "--out", str(out)]
    runs = mma.main(args)
    res = json.loads((out / "results.json").read_text())
    assert [r["insert_layer"] for r in res["runs"]] == [0, 1, 2]
    assert len(res["alignment"]["knn_trained"]) == 2 and len(res["alignment"]["knn_trained"][0]) == 4
    assert "zero_retrain" in res["runs"][0]
    assert res["cost"]["2"]["flops_counted"] < res["cost"]["0"]["flops_counted"]
    assert any(f.startswith("backbones_") for f in os.listdir(out))
    # second run reuses the cached backbones and gives the same numbers (CPU, same seed)
    again = mma.main(args)
    assert [r["qa_acc"] for r in again] == [r["qa_acc"] for r in runs]


@pytest.mark.parametrize("args,word", [
    (["--insert-layer", "8"], "insert-layer"),
    (["--insert-layer", "-2"], "insert-layer"),
    (["--image-tokens", "5"], "image-tokens"),
    (["--seeds", "a,b"], "seeds"),
    (["--data-dir", "no/such/dir"], "data-dir"),
])
def test_bad_input_exits_2(args, word, capsys):
    with pytest.raises(SystemExit) as e:
        mma.main(args + ["--out", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert word in err and len(err.splitlines()) == 1


def test_qa_batch_targets_the_answer_after_the_prompt():
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "question:": 4, "answer:": 5, "red": 6, "x": 7}
    items = [(0, [1, 4, 7, 5], 6, "colour"), (1, [1, 4, 7, 7, 7, 5], 6, "colour")]
    inp, tgt = mma.qa_batch(items, vocab)
    assert inp.shape == tgt.shape == (2, 7)
    for j, (_, p, a, _) in enumerate(items):
        assert inp[j, len(p) - 1] == 5 and tgt[j, len(p) - 1] == a      # at "answer:", predict the answer
        assert inp[j, len(p)] == a and tgt[j, len(p)] == 2               # then <eos>
        assert (tgt[j, : len(p) - 1] == 0).all() and (tgt[j, len(p) + 1:] == 0).all()


def test_data_dir_smoke(tmp_path):
    from data.shapes import generate, save_dir
    ds = generate(40, "train", seed=2, size=16)
    save_dir(ds, tmp_path / "data", splits=["train"] * 28 + ["val"] * 6 + ["test"] * 6)
    out = tmp_path / "out"
    mma.main(["--data-dir", str(tmp_path / "data"), "--image-size", "16", "--clip-steps", "1", "--lm-steps", "1",
              "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "8", "--d-model", "32", "--n-layer", "4",
              "--n-head", "2", "--vit-dim", "16", "--vit-layers", "2", "--image-tokens", "4", "--knn-k", "2",
              "--insert-layer", "1", "--device", "cpu", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["alignment"]["n"] == 6 and res["runs"][0]["holdout_acc"] is None

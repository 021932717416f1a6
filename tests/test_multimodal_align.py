"""DeepInsert on world v2: the splice against a masked reference, the KV cache, FLOPs, alignment
metrics, the shared vision encoder (cache, minimal pairs), the gates (computed, never asserted),
smoke runs, bad input."""

import json
import os

import numpy as np
import pytest
import torch

import multimodal_align as mma
from data import shapes, vision

TINY = dict(d_model=32, n_layer=4, n_head=2, vit_dim=16, vit_layers=2, image_tokens=4,
            image_size=16, patch=4)
SMOKE = ["--n-train", "80", "--n-eval", "20", "--image-size", "24", "--vit-dim", "16",
         "--vit-layers", "1", "--vit-steps", "2", "--d-model", "16", "--n-layer", "4",
         "--n-head", "2", "--lm-steps", "2", "--lm-scenes", "200", "--stage1-steps", "1",
         "--stage2-steps", "2", "--batch-size", "8", "--align-groups", "3", "--knn-k", "3",
         "--prefill-batch", "4", "--device", "cpu",
         "--ignore-gates"]                           # backbones this small fail their gates


def tiny_bridge(seed=0, V=30):
    torch.manual_seed(seed)
    cfg = mma.Config(**TINY)
    model = mma.Bridge(mma.LM(V, cfg), cfg).double().eval()
    for blk in model.lm.blocks:        # the mix starts as the identity: make it mix, so the
        blk.mix_w.data.normal_()       # splice, reference and cache tests cover it
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
    # plain LLaVA: [bos, image tokens, text] from the input embeddings, positions 0.., causal
    h = torch.cat([lm.emb(ids[:, :1]), model.project(feats), lm.emb(ids[:, 1:])], 1)
    pos = torch.arange(h.shape[1])
    for blk in lm.blocks:
        h = blk(h, pos)
    M = feats.shape[1] * cfg.tokens_per_cell
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
    mma.deep_insert_blocks(model.lm.blocks, model.lm.emb(ids), model.project(feats), 2, caches)
    T, M = ids.shape[1], feats.shape[1] * cfg.tokens_per_cell
    assert [c["k"].shape[2] for c in caches] == [T, T, T + M, T + M]


def test_flop_formula_matches_counter():
    cfg, model, feats, ids = tiny_bridge()
    img = model.project(feats[:1]).float()
    lm = model.lm.float()
    T, M, N, D = ids.shape[1], img.shape[1], cfg.n_layer, cfg.d_model
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



def test_minimal_pairs_change_one_attribute():
    rng = np.random.default_rng(0)
    objs = [("square", "red", "large", 0), ("x", "blue", "small", 4), ("ring", "green", "large", 8)]
    for kind in vision.MINIMAL_PAIR_KINDS:
        alt = vision.minimal_pair(objs, kind, rng)
        diff = [(a, b) for a, b in zip(objs, alt) if a != b]
        if kind == "binding":   # two objects swap colours; shapes, sizes and cells stay
            assert len(diff) == 2 and sorted(o[1] for o in alt) == sorted(o[1] for o in objs)
        else:
            (a, b), = diff
            field = {"shape": 0, "colour": 1, "size": 2, "cell": 3}[kind]
            assert [i for i in range(4) if a[i] != b[i]] == [field]
    two = [("x", "red", "large", 0), ("x", "blue", "small", 1)]
    assert vision.minimal_pair(two, "binding", rng) is None


def test_minimal_pair_accuracy_is_computed_not_assumed():
    objs = [o for o in shapes.generate(60, "val", seed=1, images=False)["objects"]]
    truth = lambda i, o: -len(set(o) ^ set(objs[i]))                   # a perfect scorer
    assert all(v == 1.0 for v in vision.minimal_pair_accuracy(truth, objs).values())
    assert all(v == 0.5 for v in vision.minimal_pair_accuracy(lambda i, o: 0.0, objs).values())
    # the caption score of a perfect set of cell log-probabilities prefers the true caption
    t = vision.cell_targets(objs)
    logp = {a: torch.nn.functional.one_hot(t[a], 1 + len(vision.CLASSES[a])).float()
            .clamp(1e-4).log() for a in vision.ATTRS}
    acc = vision.minimal_pair_accuracy(lambda i, o: vision.caption_score(logp, i, o), objs)
    assert all(v == 1.0 for v in acc.values())


def test_encoder_cache_is_reused(tmp_path, monkeypatch):
    vc = vision.VisionConfig(image_size=24, dim=16, layers=1, heads=2, n_train=64, n_heldout=30,
                             steps=3, batch_size=16)
    cpu = torch.device("cpu")
    vit, heads, rep = vision.load_or_pretrain(vc, str(tmp_path), cpu, log=lambda s: None)
    assert rep["trained"] and os.path.exists(rep["path"])
    assert set(rep["minimal_pairs"]) == set(vision.MINIMAL_PAIR_KINDS)         # computed, not gated
    assert all(0 <= v <= 1
               for v in list(rep["minimal_pairs"].values()) + list(rep["cell_probe"].values()))

    def no_training(*a, **k):
        raise AssertionError("the second load must not train")
    monkeypatch.setattr(vision, "pretrain", no_training)
    vit2, _, rep2 = vision.load_or_pretrain(vc, str(tmp_path), cpu, log=lambda s: None)
    assert not rep2["trained"] and rep2["minimal_pairs"] == rep["minimal_pairs"]
    for a, b in zip(vit.state_dict().values(), vit2.state_dict().values()):
        assert torch.equal(a, b)
    img = shapes.generate(2, "test", size=24)["images"]
    assert vision.tokens(vit2, img, 3, cpu).shape == (2, 9, 16)


def test_text_ceiling_is_computed_per_type():
    world = {"test": shapes.generate(20, "test", seed=0, images=False)}
    vocab = shapes.build_vocab(shapes.all_texts(world["test"])
                               + ["question: answer: caption: context:"])
    cfg = mma.Config(**TINY)
    torch.manual_seed(0)
    got = mma.text_ceiling(mma.LM(len(vocab), cfg).eval(), world["test"], vocab,
                           torch.device("cpu"))
    assert set(got) == set(shapes.QUESTION_TYPES) and all(0 <= v <= 1 for v in got.values())


def test_lm_corpus_packs_questions_after_one_context():
    ds = shapes.generate(3, "train", seed=0, images=False)
    texts = mma.lm_texts(ds, np.random.default_rng(0), per_context=3)
    ctx = [t for t in texts if t.startswith("context:")]
    assert sum(t.count("question:") for t in ctx) == sum(len(q) for q in ds["qa"])
    assert all(1 <= t.count("question:") <= 3 for t in ctx)
    vocab = shapes.build_vocab(texts)
    ids = torch.tensor([mma.encode(vocab, ctx[0])])
    m = mma.answer_mask(ids, vocab)
    assert m.sum() == ctx[0].count("answer:")


def test_quick_smoke_run_then_cached_rerun(tmp_path, monkeypatch, capsys):
    args = ["--quick"] + SMOKE + ["--out", str(tmp_path / "out"),
                                  "--cache-dir", str(tmp_path / "cache")]
    first = mma.main(args)
    printed = capsys.readouterr().out
    for section in ("baseline blind prior", "baseline bag-of-words oracle", "minimal pairs",
                    "text ceiling", "mutual k-NN", "zero-retrain", "rises with LM depth"):
        assert section in printed
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["gates"]["vision_minimal_pairs"]) == {"colour", "shape", "size", "cell",
                                                          "binding"}
    assert set(res["gates"]["lm_text_ceiling"]) == set(shapes.QUESTION_TYPES)
    for b in ("blind_prior", "bag_oracle"):
        assert set(shapes.QUESTION_TYPES) <= set(res["baselines"][b])
    assert [r["insert_layer"] for r in res["runs"]] == [0, 1, 2, 3, None]
    for key in ("seed", "overall", "binding_score", "per_type", "holdout", "flops_saved_formula",
                "flops_saved_counted", "prefill_ms"):
        assert key in res["runs"][0]
    assert res["runs"][2]["flops_saved_counted"] > res["runs"][1]["flops_saved_counted"] > 0
    knn = res["alignment"]["knn_trained"]
    assert len(knn) == 2 and len(knn[0]) == 5
    assert "zero_retrain" in res["runs"][0]
    # metrics.jsonl: every training loop's losses under a name that tells the runs apart, and each
    # test evaluation
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    names = {r["run"] for r in recs if "loss" in r}
    assert {"vision", "lm", "seed 0 l=0 stage1", "seed 0 l=3 stage2",
            "seed 0 l=none stage2"} <= names
    assert "seed 0 l=none stage1" not in names            # the no-image control has no projector
    tests = {r["run"]: r for r in recs if r.get("split") == "test"}
    assert ([tests[f"seed 0 l={l}"]["qa"] for l in (0, 1, 2, 3, "none")]
            == [r["overall"] for r in res["runs"]])
    # the PNGs, named in the output, exactly when matplotlib is there
    pngs = [tmp_path / "out" / f for f in ("scenes.png", "alignment.png", "qa_vs_compute.png")]
    if mma.pyplot() is None:
        assert "figure:" not in printed and not any(p.exists() for p in pngs)
    else:
        assert all(f"figure: {p}" in printed and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                   for p in pngs)
    # the rerun trains no backbone, keeps the earlier results, and gives the same numbers (CPU, same
    # seed)
    monkeypatch.setattr(vision, "pretrain", lambda *a, **k: pytest.fail("vision retrained"))
    monkeypatch.setattr(mma, "pretrain_lm", lambda *a, **k: pytest.fail("LM retrained"))
    again = mma.main(args + ["--insert-layer", "0"])
    assert again["runs"][0]["overall"] == first["runs"][0]["overall"]
    assert again["runs"][0]["per_type"] == first["runs"][0]["per_type"]
    assert (tmp_path / "out" / "previous_1" / "results.json").exists()
    assert all((tmp_path / "out" / "previous_1" / p.name).exists() == p.exists()
               for p in pngs)                                                   # figures move too


def write_dir(path, n=40, size=24, splits=None, drop_qa=False):
    ds = shapes.generate(n, "train", seed=2, size=size)
    if drop_qa:
        ds["qa"] = [[] for _ in ds["qa"]]
    shapes.save_dir(ds, path, splits=splits or ["train"] * (n - 8) + ["val"] * 4 + ["test"] * 4)
    return str(path)


def test_data_dir_smoke(tmp_path):
    d = write_dir(tmp_path / "data")
    res = mma.main(SMOKE + ["--data-dir", d, "--insert-layer", "1", "--out", str(tmp_path / "out"),
                            "--cache-dir", str(tmp_path / "cache")])
    assert res["runs"][0]["holdout"] is None and res["baselines"]["bag_oracle"] is None
    assert 0 <= res["runs"][0]["overall"] <= 1


@pytest.mark.parametrize("make,word", [
    (lambda p: ["--insert-layer", "8"], "insert-layer"),
    (lambda p: ["--image-tokens", "5"], "image-tokens"),
    (lambda p: ["--seeds", "a,b"], "seeds"),
    (lambda p: ["--tokens-per-cel", "2"], "unrecognized arguments: --tokens-per-cel"),  # no abbrev.
    (lambda p: ["--lr", "0"], "--lr"),
    (lambda p: ["--lr=-1e-3"], "--lr"),
    (lambda p: ["--lm-lr", "inf"], "--lm-lr must be positive and finite, got inf"),
    (lambda p: ["--image-size", "50"], "image-size"),
    (lambda p: ["--data-dir", str(p / "no-such-dir")], "data-dir"),
    (lambda p: ["--out", str(p / "afile" / "out")], "--out"),
    (lambda p: ["--data-dir", write_dir(p / "d1", drop_qa=True)], "no questions"),
    (lambda p: ["--data-dir", write_dir(p / "d2", splits=["train"] * 36 + ["dev"] * 4)],
     "unknown split"),
    (lambda p: ["--data-dir", write_dir(p / "d3", size=30)], "multiple of --patch"),
    (lambda p: ["--device", "mps"] if not torch.backends.mps.is_available() else ["--lr", "0"],
     "--"),
    (lambda p: ["--device", "cuda"] if not torch.cuda.is_available() else ["--lr", "0"], "--"),
    (lambda p: ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (lambda p: ["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (lambda p: ["--threads", "-1"], "--threads must be >= 0"),
    (lambda p: ["--knn-k", "0"], "--knn-k must be positive"),
    (lambda p: ["--n-train", "10"], "--n-train 10 must fill a batch"),
])
def test_bad_input_exits_2_before_training(make, word, tmp_path, capsys, monkeypatch):
    """Each user error: exit 2, one line on stderr and no traceback, nothing trained, and the
    results of an earlier run in that --out untouched (byte for byte, nothing moved to
    previous_<k>/, no metrics.jsonl)."""
    (tmp_path / "afile").write_text("a file, not a folder")
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_bytes(b'{"earlier": 1}')
    (out / "bridge_l0_seed0.pt").write_bytes(b"earlier")
    for mod, name in ((mma, "train_bridge"), (mma, "pretrain_lm"), (vision, "pretrain")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("trained on bad input"))
    with pytest.raises(SystemExit) as e:   # the last --out wins
        mma.main(SMOKE + ["--out", str(out), "--cache-dir", str(tmp_path / "c")] + make(tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert word in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["bridge_l0_seed0.pt", "results.json"]
    assert (out / "results.json").read_bytes() == b'{"earlier": 1}'
    assert (out / "bridge_l0_seed0.pt").read_bytes() == b"earlier"


def test_qa_batch_targets_the_answer_after_the_prompt():
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "question:": 4, "answer:": 5, "red": 6,
             "x": 7}
    items = [(0, [1, 4, 7, 5], 6, "colour"), (1, [1, 4, 7, 7, 7, 5], 6, "colour")]
    inp, tgt = mma.qa_batch(items, vocab)
    assert inp.shape == tgt.shape == (2, 7)
    for j, (_, p, a, _) in enumerate(items):
        assert inp[j, len(p) - 1] == 5 and tgt[j, len(p) - 1] == a   # at "answer:", the answer
        assert inp[j, len(p)] == a and tgt[j, len(p)] == 2               # then <eos>
        assert (tgt[j, : len(p) - 1] == 0).all() and (tgt[j, len(p) + 1:] == 0).all()


def test_primer_mix_equals_a_plain_loop():
    """LMBlock(mix=K), the shared data/layers.Block with the deep-insert hooks: z'_i = sum_k w_k *
    z_(i-k), zero before the start; the gather path (used by the masked reference with its own
    predecessors) agrees with the shift path; decoding with a cache agrees too; the plain Block's
    mix is the same shift."""
    torch.manual_seed(0)
    blk = mma.LMBlock(8, 2, causal=True, mix=3).double()
    blk.mix_w.data.normal_()
    z = torch.randn(2, 6, 24, dtype=torch.float64)
    want = torch.stack([sum(blk.mix_w[:, k] * z[:, i - k] for k in range(3) if i - k >= 0)
                        for i in range(6)], 1)
    torch.testing.assert_close(blk.mix(z), want)
    torch.testing.assert_close(mma.Block.mix(blk, z), want)
    torch.testing.assert_close(blk.mix(z, prev_L=torch.arange(6) - 1), want)
    cache = {}
    steps = [blk.mix(z[:, :4], cache=cache)] + [blk.mix(z[:, i:i + 1], cache=cache) for i in (4, 5)]
    torch.testing.assert_close(torch.cat(steps, 1), want)
    skip = torch.tensor([-1, 0, 1, 1, 3, 4])   # position 3 skips position 2, as text skips images
    got = blk.mix(z, prev_L=skip)[:, 3]
    torch.testing.assert_close(got, blk.mix_w[:, 0] * z[:, 3] + blk.mix_w[:, 1] * z[:, 1]
                               + blk.mix_w[:, 2] * z[:, 0])
    enc = mma.Block(8, 2, causal=False, mix=3).double()   # an encoder: bidirectional, causal conv
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    x2 = torch.cat([x[:, :4], torch.randn(1, 1, 8, dtype=torch.float64)], 1)
    assert not torch.allclose(enc(x, torch.arange(5))[:, :4],
                              enc(x2, torch.arange(5))[:, :4])          # the last token is seen


def test_zero_step_stages_run(tmp_path):
    """Every *-steps flag accepts 0 (skip that training); the run still evaluates and writes
    results."""
    args = SMOKE + ["--vit-steps", "0", "--lm-steps", "0", "--stage1-steps", "0",
                    "--stage2-steps", "0", "--insert-layer", "0", "--out", str(tmp_path / "out"),
                    "--cache-dir", str(tmp_path / "cache")]
    res = mma.main(args)
    assert [r["insert_layer"] for r in res["runs"]] == [0] and 0 <= res["runs"][0]["overall"] <= 1


def test_figures_without_matplotlib_are_none(monkeypatch, tmp_path):
    """matplotlib is optional: without it (pyplot() gives None) no PNG is written and none is
    named."""
    monkeypatch.setattr(mma, "pyplot", lambda: None)
    assert mma.figures(mma.Config(out=str(tmp_path)), {}, [], {}) == []
    assert not list(tmp_path.iterdir())


def test_figures_from_a_results_dict(tmp_path):
    """The three PNGs from results of the run's shape (hand-made numbers): scenes, alignment maps,
    QA vs compute."""
    pytest.importorskip("matplotlib")
    cfg = mma.Config(n_layer=4, vit_layers=1, d_model=16, out=str(tmp_path))
    knn = [[0.1, 0.2, 0.3, 0.4, 0.5]] * 2
    zero = {0: 0.5, 1: 0.4, 2: 0.3, 3: 0.2}
    res = dict(alignment=dict(n=16, chance_knn=0.2, knn_trained=knn, knn_shuffled_null=knn,
                              knn_random_lm=knn),
               cost={"0": dict(T=12, M=36, flops_formula=mma.prefill_flops(12, 36, 4, 0, 16, 64))},
               baselines=dict(blind_prior=dict(overall=0.3), bag_oracle=None),
               runs=[dict(insert_layer=l, overall=0.5, binding_score=0.4,
                          **({"zero_retrain": zero} if l == 0 else {}))
                     for l in (0, 1, 2, 3, None)])
    paths = mma.figures(cfg, res, [0, 1, 2, 3, None], {"test": shapes.generate(5, "test", size=24)})
    assert [os.path.basename(p) for p in paths] == ["scenes.png", "alignment.png",
                                                    "qa_vs_compute.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_quick_switches_the_defaults_and_explicit_flags_win(monkeypatch, tmp_path):
    """--quick sets every QUICK value; a flag given with it still wins; without it the defaults are
    Config()'s."""
    monkeypatch.setattr(mma, "run", lambda cfg: cfg)
    cfg = mma.main(["--quick"])
    assert cfg.quick and all(getattr(cfg, k) == v for k, v in mma.QUICK.items())
    cfg = mma.main(["--quick", "--stage2-steps", "7", "--threads", "1", "--out", str(tmp_path)])
    assert (cfg.stage2_steps, cfg.threads, cfg.out) == (7, 1, str(tmp_path))
    assert cfg.n_train == mma.QUICK["n_train"]
    assert mma.main([]) == mma.Config()


def test_a_failed_gate_stops_before_any_bridge_trains(tmp_path, monkeypatch, capsys):
    """Backbones this small fail their gates: without --ignore-gates the run stops (exit 3, one line
    on stderr) before a bridge trains, at the vision gate, then (vision gate set to pass) at the
    LM's; --quick goes on."""
    base = [a for a in SMOKE if a != "--ignore-gates"] + ["--insert-layer", "0", "--cache-dir",
                                                          str(tmp_path / "c")]
    real = mma.train_bridge
    monkeypatch.setattr(mma, "train_bridge", lambda *a, **k: pytest.fail("a bridge trained on it"))
    for gate, word in ((vision.GATE, "vision encoder"), (0.0, "frozen LM text ceiling")):
        monkeypatch.setattr(vision, "GATE", gate)
        with pytest.raises(SystemExit) as e:
            mma.main(base + ["--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 3 and len(err.splitlines()) == 1
        assert f"failed its gate ({word}" in err
    monkeypatch.setattr(mma, "train_bridge", real)
    res = mma.main(base + ["--quick", "--out", str(tmp_path / "q")])
    assert "FAIL" in capsys.readouterr().out and len(res["runs"]) == 1


def test_vary_backbones_draws_the_world_and_both_backbones_per_seed(tmp_path, monkeypatch):
    """--seeds 0,1: the bridges differ, the world's train scenes and the backbones stay at seed 0;
    with --vary-backbones, seed 1 gets train scenes, a ViT and an LM of seed 1 (and seed 0 those of
    seed 0)."""
    calls = {"vision": [], "lm": [], "train": []}
    real_vis, real_lm, real_bridge = vision.load_or_pretrain, mma.pretrain_lm, mma.train_bridge

    def vis(vc, cache_dir, device, seed=0, **k):
        calls["vision"].append(seed)
        return real_vis(vc, cache_dir, device, seed=seed, **k)

    def lm(*a, **k):
        calls["lm"].append(a[5] if len(a) > 5 else k.get("seed", 0))
        return real_lm(*a, **k)

    def bridge(lm0, feats, world, *a, **k):
        calls["train"].append((world["train"]["captions"][0], float(lm0.emb.weight.detach().sum())))
        return real_bridge(lm0, feats, world, *a, **k)

    monkeypatch.setattr(vision, "load_or_pretrain", vis)
    monkeypatch.setattr(mma, "pretrain_lm", lm)
    monkeypatch.setattr(mma, "train_bridge", bridge)
    args = SMOKE + ["--insert-layer", "0", "--seeds", "0,1", "--cache-dir", str(tmp_path / "c")]
    res = mma.main(args + ["--out", str(tmp_path / "a")])
    assert calls["vision"] == [0] and calls["lm"] == [0] and calls["train"][0] == calls["train"][1]
    assert [r["backbone_seed"] for r in res["runs"]] == [0, 0]
    assert list(res["backbone_gates"]) == ["0"]
    calls.update(vision=[], lm=[], train=[])
    res = mma.main(args + ["--vary-backbones", "--out", str(tmp_path / "b")])
    assert calls["vision"] == [0, 1] and calls["lm"] == [1]      # seed 0's LM comes from the cache
    (cap0, w0), (cap1, w1) = calls["train"]
    assert cap0 != cap1 and w0 != w1
    assert cap0 == shapes.generate(1, "train", seed=0)["captions"][0]          # load_world's world
    assert [r["backbone_seed"] for r in res["runs"]] == [0, 1]
    assert list(res["backbone_gates"]) == ["0", "1"]


def test_both_multimodal_configs_share_one_base():
    """The flags both multimodal files share are declared once (data/multimodal.MultimodalConfig):
    each file's Config subclasses it and keeps every shared field's name, type and default; the
    --help groups still read data, frozen backbones, the bridge, experiment, run."""
    from dataclasses import fields

    import qformer_efficient as qfe
    from data.multimodal import MultimodalConfig

    base = {f.name: (f.type, f.default) for f in fields(MultimodalConfig)}
    for cls in (mma.Config, qfe.Config):
        assert issubclass(cls, MultimodalConfig)
        assert {f.name: (f.type, f.default) for f in fields(cls) if f.name in base} == base
        groups = list(dict.fromkeys(f.metadata["group"] for f in fields(cls)))
        assert groups[:2] == ["data", "frozen backbones"] and groups[-2:] == ["experiment", "run"]

"""logit_correction.py: losses against hand-computed values, fast code against slow oracles, Group
MixUp, a smoke run of main(), determinism, and bad-input errors. CPU, seconds."""
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import logit_correction as lc  # noqa: E402
from data import digits  # noqa: E402

TINY = ["--threads", "1", "--n-train", "300", "--n-val", "100", "--n-test", "100", "--epochs", "2",
        "--batch-size", "64", "--log-every", "0"]


# ------------------------------------------------------------------------------------------ losses

def test_lc_loss_equals_ce_when_prior_is_uniform():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    # any constant column: ln c cancels in the softmax
    for c in (0.01, 0.37):
        delta = torch.full((16, 10), c)
        assert torch.allclose(lc.lc_loss(logits, y, delta),
                              F.cross_entropy(logits, y, reduction="none"), atol=1e-6)


def test_corrected_logits_shift_by_log_prior_exactly():
    torch.manual_seed(0)
    logits = torch.randn(8, 10, dtype=torch.float64)
    delta = torch.rand(8, 10, dtype=torch.float64) * 0.5 + 1e-3
    shift = lc.corrected_logits(logits, delta) - logits
    assert torch.allclose(shift, torch.log(delta), atol=1e-12, rtol=0)
    # by hand: raw logits (0, 0), prior column (0.9, 0.1), label 1
    #   -> CE((ln .9, ln .1), 1) = -ln(0.1) = ln 10
    val = lc.lc_loss(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([[0.9, 0.1]]))
    assert val.item() == pytest.approx(math.log(10), abs=1e-6)
    # the floor: a zero prior entry becomes ln(eps), never -inf
    assert lc.corrected_logits(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]),
                               eps=1e-4)[0, 0].item() == pytest.approx(math.log(1e-4))


def test_gce_value_and_gradient_by_hand():
    # logits (ln 3, 0) -> p = (0.75, 0.25); label 0; q = 0.5
    logits = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64, requires_grad=True)
    loss = lc.gce_loss(logits, torch.tensor([0]), q=0.5)
    assert loss.item() == pytest.approx((1 - 0.75 ** 0.5) / 0.5, abs=1e-12)          # 0.2679491924
    assert loss.item() == pytest.approx(0.2679491924311227, abs=1e-12)
    loss.sum().backward()
    # d GCE / d logits = p_y^q * (softmax - onehot) = sqrt(0.75) * (-0.25, 0.25)
    assert logits.grad[0].tolist() == pytest.approx([-0.2165063509, 0.2165063509], abs=1e-9)
    # q -> 0 recovers cross-entropy: (1 - p^q) / q -> -ln p
    z = torch.randn(5, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    assert torch.allclose(lc.gce_loss(z, y, q=1e-7), F.cross_entropy(z, y, reduction="none"),
                          atol=1e-5)


def test_margins_against_loop():
    torch.manual_seed(0)
    z, y = torch.randn(20, 10), torch.randint(0, 10, (20,))
    slow = [z[i, y[i]].item() - max(z[i, k].item() for k in range(10) if k != y[i])
            for i in range(20)]
    assert lc.margins(z, y).tolist() == pytest.approx(slow, abs=1e-6)


# ------------------------------------------------------------------------------------- group prior

def test_update_prior_against_counting_loop():
    torch.manual_seed(0)
    y, a = torch.randint(0, 10, (64,)), torch.randint(0, 10, (64,))
    slow = np.zeros((10, 10))
    for yi, ai in zip(y.tolist(), a.tolist()):
        slow[yi, ai] += 1
    num0, den0 = torch.full((10, 10), 0.3), 30.0
    num, den = lc.update_prior(num0, den0, y, a, 0.9)
    assert np.allclose(num.numpy(), 0.9 * 0.3 + slow, atol=1e-6)
    assert den == pytest.approx(0.9 * 30 + 64)
    # first step: the batch frequencies
    num, den = lc.update_prior(torch.zeros(10, 10), 0.0, y, a, 0.9)
    assert np.allclose((num / den).numpy(), slow / 64, atol=1e-7)
    # a partial batch counts by its size: 64 then 16 samples = the frequencies of all 80 at beta = 1
    y2, a2 = torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))
    num, den = lc.update_prior(num, den, y2, a2, 1.0)
    both = np.zeros((10, 10))
    np.add.at(both, (torch.cat([y, y2]).numpy(), torch.cat([a, a2]).numpy()), 1)
    assert np.allclose((num / den).numpy(), both / 80, atol=1e-7)


def test_prior_reaches_true_group_frequencies_within_one_epoch():
    """Perfect pseudo-attributes, one epoch of shuffled batches: Delta = the true P(y, a), rare
    cells included. A uniform start without bias correction is still far off after that epoch."""
    g = torch.Generator().manual_seed(0)
    N, B, beta = 20000, 256, 0.995
    y = torch.arange(N) % 10
    a = y.clone()
    conf = torch.randperm(N, generator=g)[:N // 50]                      # rho = 2 %
    a[conf] = (y[conf] + 1 + torch.randint(0, 9, (len(conf),), generator=g)) % 10
    true = torch.bincount(y * 10 + a, minlength=100).view(10, 10).float() / N
    num, den, v1 = torch.zeros(10, 10), 0.0, torch.full((10, 10), 0.01)
    perm = torch.randperm(N, generator=g)
    for s in range(0, N, B):
        i = perm[s:s + B]
        num, den = lc.update_prior(num, den, y[i], a[i], beta)
        p_b = torch.bincount(y[i] * 10 + a[i], minlength=100).view(10, 10).float() / len(i)
        v1 = 0.99 * v1 + 0.01 * p_b
    delta = num / den
    assert delta.sum().item() == pytest.approx(1.0, abs=1e-5)
    diag = torch.eye(10, dtype=torch.bool)
    # aligned cells within 1 %
    assert torch.allclose(delta[diag], true[diag], rtol=0.01)
    # rare cells (true 2.2e-4 each)
    assert (delta[~diag] - true[~diag]).abs().max() < 1e-4
    # the margin LC asks of the rare cells, ln Delta[y, a] / Delta[a, a], within 0.1 of the truth on
    # average
    lr = lambda d: torch.log(d[~diag].clamp_min(1e-4)).mean() - torch.log(d[diag]).mean()
    assert abs(lr(delta) - lr(true)) < 0.1
    # v1: nowhere near after one epoch
    assert abs(lr(v1) - lr(true)) > 2.0


# -------------------------------------------------------------------------- LfF, GroupDRO, sampler

def test_lff_weights_by_hand():
    """4 images, classes (0, 0, 1, 1); EMA 0.5. First visit: the EMA is the loss itself; weights use
    class maxima."""
    S = SimpleNamespace(cfg=SimpleNamespace(lff_ema=0.5), y_N=torch.tensor([0, 0, 1, 1]),
                        ema_b=torch.zeros(4), ema_d=torch.zeros(4),
                        seen=torch.zeros(4, dtype=torch.bool))
    idx, y = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    w = lc.lff_weights(S, idx, y, torch.tensor([2.0, 1.0, 4.0]), torch.tensor([1.0, 1.0, 2.0]))
    # class 0: max l_b = 2, max l_d = 1 -> image 0: (1, 1) -> 1/2; image 1: (0.5, 1) -> 1/3;
    # class 1: (1, 1) -> 1/2
    assert w.tolist() == pytest.approx([0.5, 1 / 3, 0.5], abs=1e-6)
    assert S.seen.tolist() == [True, True, True, False]
    # second visit of image 1 (and first of image 3): EMA_b(1) = 0.5 * 1 + 0.5 * 3 = 2,
    # EMA_d(1) = 0.5 * 1 + 0.5 * 0 = 0.5
    w = lc.lff_weights(S, torch.tensor([1, 3]), torch.tensor([0, 1]), torch.tensor([3.0, 1.0]),
                       torch.tensor([0.0, 8.0]))
    # class 0 maxima now: l_b max(2, 2) = 2, l_d max(1, 0.5) = 1 -> image 1: (1, 0.5) -> 2/3
    # class 1 maxima: l_b max(4, 1) = 4, l_d max(2, 8) = 8 -> image 3: (0.25, 1) -> 0.2
    assert w.tolist() == pytest.approx([2 / 3, 0.2], abs=1e-6)
    assert S.ema_b.tolist() == pytest.approx([2.0, 2.0, 4.0, 1.0])
    assert S.ema_d.tolist() == pytest.approx([1.0, 0.5, 2.0, 8.0])


def test_groupdro_update_and_loss_by_hand():
    q = torch.full((4,), 0.25)
    loss = torch.tensor([1.0, 2.0, 0.0, 3.0])
    new = lc.dro_update(q, loss, torch.tensor([True, True, False, True]), eta=0.5)
    # group 2 absent: its factor is 1
    e = [math.exp(0.5), math.exp(1.0), 1.0, math.exp(1.5)]
    assert new.tolist() == pytest.approx([v / sum(e) for v in e], abs=1e-6)
    # the training loss: sum_g q_g * (mean CE of group g in the batch), gradients through CE only
    torch.manual_seed(0)
    net = lc.mlp()
    S = SimpleNamespace(net=net, a_N=torch.tensor([0, 0, 5, 1]), q_G=torch.full((100,), 0.01),
                        cfg=SimpleNamespace(dro_eta=0.1))
    x, y = torch.randn(4, 3, 28, 28), torch.tensor([0, 0, 0, 1])
    got = lc.loss_groupdro(S, x, y, torch.arange(4))
    ce = F.cross_entropy(net(x), y, reduction="none").detach()
    gl = {0: (ce[0] + ce[1]) / 2, 5: ce[2], 11: ce[3]}                     # groups y * 10 + a
    w = {g: 0.01 * math.exp(0.1 * v.item()) for g, v in gl.items()}
    Z = sum(w.values()) + 0.01 * 97
    assert got.item() == pytest.approx(sum(w[g] / Z * gl[g].item() for g in gl), rel=1e-5)
    assert S.q_G.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert S.q_G[5].item() == pytest.approx(w[5] / Z, rel=1e-5)


def test_balanced_order_group_frequencies():
    g = torch.cat([torch.zeros(5000), torch.full((40,), 7), torch.full((1,), 42),
                   torch.full((200,), 99)]).long()
    g = g[torch.randperm(len(g), generator=torch.Generator().manual_seed(1))]
    idx = lc.balanced_order(g, 40000, torch.Generator().manual_seed(0))
    freq = torch.bincount(g[idx], minlength=100).float() / len(idx)
    assert set(torch.nonzero(freq).squeeze(1).tolist()) == {0, 7, 42, 99}     # never an empty group
    # 1/4 each, whatever its size
    assert freq[[0, 7, 42, 99]].tolist() == pytest.approx([0.25] * 4, abs=0.01)
    # uniform within a group too
    inside = torch.bincount(idx[g[idx] == 7], minlength=len(g))[g == 7]
    assert inside.min() > 0.5 * inside.float().mean()
    assert (g[lc.balanced_order(g, 10, torch.Generator().manual_seed(3))] >= 0).all()


# ------------------------------------------------------------------------------------- Group MixUp

def test_group_mixup_partners_are_same_class_minority():
    y_N = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    # class 0: minority {2, 3}; class 1: none
    a_mem = torch.tensor([0, 0, 3, 5, 1, 1, 1, 7, 2, 2])
    pools = lc.minority_pools(y_N, a_mem, C=10)
    assert pools[0].tolist() == [2, 3] and pools[1].tolist() == [] and pools[2].tolist() == [7]
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(10)
    for _ in range(20):
        j = lc.pick_partners(y_N[idx], idx, pools, gen)
        assert (y_N[j] == y_N[idx]).all()                               # same class, always
        for i in range(10):
            if len(pools[y_N[i]]):
                # a (pseudo-)minority partner
                assert a_mem[j[i]] != y_N[i]
            else:
                # no minority yet: itself, a no-op mix
                assert j[i] == i


def test_group_mixup_batch_pools_fall_back_to_same_class():
    """--mix-pool batch (official code): minority partners come from the batch; a class without a
    pseudo-minority sample in the batch is mixed with a random same-class sample of the batch."""
    # training-set indices of the batch
    idx = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    # only class 0 has a pseudo-minority (12)
    a_hat = torch.tensor([0, 0, 4, 1, 1, 2, 2])
    pools = [idx[m] for m in lc.minority_pools(y, a_hat, C=10)]
    assert pools[0].tolist() == [12] and all(len(p) == 0 for p in pools[1:])
    gen = torch.Generator().manual_seed(0)
    pos = {int(i): b for b, i in enumerate(idx)}
    for _ in range(20):
        j = lc.pick_partners(y, idx, pools, gen, fallback="class")
        # class 0: always its minority sample
        assert j[:3].tolist() == [12, 12, 12]
        # every partner in the batch, same class
        assert all(y[pos[int(jj)]] == y[b] for b, jj in enumerate(j))
        # a within-class shuffle
        assert sorted(j[3:5].tolist()) == [13, 14] and sorted(j[5:].tolist()) == [15, 16]


def test_group_mixup_mixes_inputs_and_prior_with_the_same_lambda():
    torch.manual_seed(0)
    B = 6
    x_i, x_j = torch.rand(B, 3, 4, 4), torch.rand(B, 3, 4, 4)
    d_i, d_j = torch.rand(B, 10), torch.rand(B, 10)
    lam = torch.rand(B)
    x_mix, d_mix = lc.group_mixup(x_i, x_j, d_i, d_j, lam)
    for b in range(B):
        assert torch.allclose(x_mix[b], lam[b] * x_i[b] + (1 - lam[b]) * x_j[b], atol=1e-6)
        assert torch.allclose(d_mix[b], lam[b] * d_i[b] + (1 - lam[b]) * d_j[b], atol=1e-6)
    # recover lambda from the inputs (x_i = 1, x_j = 0) and check Delta used the very same one
    x_mix, d_mix = lc.group_mixup(torch.ones(B, 3), torch.zeros(B, 3), torch.ones(B, 10),
                                  torch.zeros(B, 10), lam)
    assert torch.allclose(x_mix[:, 0], lam) and torch.allclose(d_mix[:, 0], lam)


# -------------------------------------------------------------------------------------- evaluation

def test_evaluate_against_slow_oracle():
    torch.manual_seed(0)
    n = 500
    x = torch.randn(n, 3, 28, 28)
    y, a = torch.randint(0, 10, (n,)), torch.randint(0, 10, (n,))
    net = lc.mlp().eval()
    got = lc.evaluate(net, x, y, a)
    pred = net(x).argmax(1)
    accs = []
    for g_y in range(10):
        for g_a in range(10):
            m = (y == g_y) & (a == g_a)
            if m.any():
                accs.append((pred[m] == y[m]).float().mean().item())
    assert got["unbiased"] == pytest.approx(100 * np.mean(accs), abs=1e-4)
    assert got["worst_group"] == pytest.approx(100 * min(accs), abs=1e-4)
    al = a == y
    assert got["aligned"] == pytest.approx(100 * (pred[al] == y[al]).float().mean().item(),
                                           abs=1e-4)
    assert got["conflicting"] == pytest.approx(100 * (pred[~al] == y[~al]).float().mean().item(),
                                               abs=1e-4)


# ------------------------------------------------------------------------------------------ main()

REQUIRED = {"method", "ratio", "seed", "dataset", "protocol", "n_conflicting", "unbiased_acc_last",
            "unbiased_acc_best_val", "aligned_acc", "conflicting_acc", "worst_group_acc", "epochs",
            "history"}


def test_mlp_default_is_lcs_reference_and_lffs_an_option():
    """LC's reference MLP: 16 features before the classifier; LfF's: 100 (--mlp lff)."""
    widths = lambda net: [m.out_features for m in net if isinstance(m, torch.nn.Linear)]
    assert widths(lc.mlp()) == [100, 100, 16, 10]
    assert widths(lc.mlp(lc.MLPS["lff"])) == [100, 100, 100, 10]
    assert lc.mlp()(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    cfg, *_ = lc.parse_config(["--mlp", "lff"])
    default_key = lc.protocol_of(lc.parse_config([])[0], "p")[1]
    assert cfg.mlp == "lff" and lc.protocol_of(cfg, "p")[1] != default_key


def test_each_method_gets_its_own_tuned_settings_unless_flags_say_otherwise():
    cfg, *_ = lc.parse_config([])
    for m in lc.METHODS:
        mc = lc.method_config(cfg, m)
        assert (mc.lr, mc.epochs, mc.decay_every) == (lc.TUNED[m]["lr"], lc.TUNED[m]["epochs"],
                                                       lc.TUNED[m]["epochs"] // 5)
    flags = ["--lr", "0.003", "--epochs", "7", "--decay-every", "0"]
    mc = lc.method_config(lc.parse_config(flags)[0], "lc")
    assert (mc.lr, mc.epochs, mc.decay_every) == (0.003, 7, 0)
    assert "tuned" in lc.protocol_of(cfg, "p")[0]            # the table is part of the protocol
    explicit = lc.parse_config(["--lr", "1e-3", "--epochs", "9"])[0]
    assert "tuned" not in lc.protocol_of(explicit, "p")[0]


def test_divergence_guard_on_hand_made_histories():
    hist = lambda vals: [{"epoch": e + 1, "val_unbiased": v} for e, v in enumerate(vals)]
    assert lc.diverged(hist([10.0, 11.0, 40.0, 60.0])) is None           # a slow start
    assert lc.diverged(hist([25.5, 41.9, 54.0, 10.0, 10.0])) == 4        # collapsed at epoch 4
    assert lc.diverged(hist([25.0, 41.0, 12.0, 50.0])) == 3              # flagged, recovered or not
    assert lc.diverged(hist([25.0, 41.0, 12.1, 50.0])) is None


def test_divergence_is_flagged_in_results_table_and_stderr(tmp_path, capsys):
    """An absurd learning rate collapses the network to chance: results.json, the table and stderr
    say so."""
    flags = ["--methods", "erm", "--ratios", "5", "--lr", "100", "--epochs", "4"]
    res = lc.main(TINY + flags + ["--out", str(tmp_path)])
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["diverged"] is True and run["diverged_epoch"] == 3 and res["runs"][0]["diverged"]
    out, err = capsys.readouterr()
    assert "DIVERGED" in out and " 1/1" in out
    assert err.count("diverged") == 1 and "warning: erm rho=5 seed=1 diverged" in err


def test_lc_does_not_collapse_at_its_default_setting(tmp_path):
    """LC at its tuned lr (method_config), lr held constant (no decay, the harsher case), on 3k
    images: the validation accuracy stays well above chance (10 %) at every epoch after the first
    two. Measured at lr 1e-2 (2026-12-06): 24.2, 23.8, 27.8, 27.6, 31.4, 31.2, 33.6, 34.8; with the
    lr at 0.1 it sits at 10.0 from epoch 2."""
    grey = digits.grey_splits("", 3000, 500, 100, 0, str(tmp_path))
    train = [torch.from_numpy(v) for v in digits.coloured_train(grey, 1.0, 1)]
    evalsets = {k: [torch.from_numpy(a) for a in v]
                for k, v in digits.coloured_eval(grey, 0).items()}
    flags = ["--epochs", "8", "--decay-every", "0", "--log-every", "0"]
    cfg = lc.method_config(lc.parse_config(flags)[0], "lc")
    rec, _ = lc.train_run("lc", 1.0, 1, train, evalsets, cfg, "cpu")
    vals = [h["val_unbiased"] for h in rec["history"]]
    assert not rec["diverged"] and min(vals[2:]) > 20.0, vals


def test_smoke_main_all_methods_and_determinism(tmp_path, capsys):
    args = TINY + ["--methods", ",".join(lc.METHODS), "--ratios", "5", "--seeds", "3", "--margins",
                   "--explain"]
    res = lc.main(args + ["--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert len(saved["runs"]) == len(lc.METHODS)
    assert {r["method"] for r in saved["runs"]} == set(lc.METHODS)
    for r in saved["runs"]:
        assert REQUIRED <= set(r) and r["dataset"] == "procedural" and r["epochs"] == 2
        # 30 images per class, rho = 5 %
        assert r["n_conflicting"] == 10 * round(0.05 * 30)
        assert 0 <= r["unbiased_acc_best_val"] <= 100
        assert 0 <= r["worst_group_acc"] <= r["unbiased_acc_best_val"]
        if r["method"] in lc.TWO_NETS:                     # the mechanism, every epoch
            assert {"precision", "recall", "colour_acc"} <= set(r["history"][0])
    ex = next(r for r in saved["runs"] if r["method"] == "lc")["explain"]
    assert ex["aligned"]["label"] == ex["aligned"]["colour"]
    assert ex["conflicting"]["label"] != ex["conflicting"]["colour"]
    assert "|dL/df|" in capsys.readouterr().out
    ck = torch.load(tmp_path / "a" / "ckpt" / f"lc_r5_s3_{saved['runs'][0]['protocol']}.pt",
                    weights_only=True)
    assert ck["config"]["method"] == "lc" and ck["config"]["epochs"] == 2
    assert ck["config"]["lr"] == lc.TUNED["lc"]["lr"]
    lc.mlp().load_state_dict(ck["best_val"])
    res2 = lc.main(args + ["--out", str(tmp_path / "b")])     # same seed, same numbers (CPU)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]
    assert strip(res["runs"]) == strip(res2["runs"])


def test_quick_sets_smoke_sizes_and_keeps_the_default_protocol_key():
    quick, *_ = lc.parse_config(["--quick"])
    assert (quick.n_train, quick.n_val, quick.n_test, quick.epochs) == (5000, 1000, 2000, 20)
    # explicit flags win
    mine, *_ = lc.parse_config(["--quick", "--epochs", "5", "--n-val", "300"])
    assert (mine.n_train, mine.n_val, mine.n_test, mine.epochs) == (5000, 300, 2000, 5)
    assert quick.out.endswith("logit_correction_quick")
    assert lc.parse_config([])[0].out.endswith("logit_correction")
    # its own folder, unless told
    assert lc.parse_config(["--quick", "--out", "elsewhere"])[0].out == "elsewhere"
    sweep, methods, ratios, seeds = lc.parse_config(["--sweep", "--seeds", "7"])
    assert (methods, ratios, seeds) == ("erm,lff,lc_nomix,lc,groupdro".split(","),
                                        [0.5, 1.0, 2.0, 5.0], [7])
    full, *_ = lc.parse_config([])
    assert lc.protocol_of(full, "procedural")[1] == "3ec138cc"          # the measured runs' key
    assert lc.protocol_of(quick, "procedural")[1] != "3ec138cc"


def test_rerun_adds_to_results_and_skips_finished_runs(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    first = lc.main(TINY + ["--methods", "erm", "--ratios", "5"] + out)["runs"]
    res = lc.main(TINY + ["--methods", "erm,lc_nomix", "--ratios", "5,10"] + out)
    assert "finished earlier" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["method"], r["ratio"]) for r in saved) == [
        ("erm", 5.0), ("erm", 10.0), ("lc_nomix", 5.0), ("lc_nomix", 10.0)]
    assert saved[0] == first[0] and len(res["runs"]) == 4
    # another protocol: a new run
    lc.main(TINY + ["--methods", "erm", "--ratios", "5", "--lr", "0.003"] + out)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 5 and len(saved["protocols"]) == 2
    capsys.readouterr()
    lc.main(["--report", str(tmp_path / "results.json")])
    assert capsys.readouterr().out.count("protocol ") == 2


def write_idx_folder(d, gz):
    d.mkdir(parents=True)
    rng, s = np.random.default_rng(0), ".gz" if gz else ""
    for split, n in (("train", 300), ("t10k", 80)):
        digits.write_idx(d / f"{split}-images-idx3-ubyte{s}",
                         rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        digits.write_idx(d / f"{split}-labels-idx1-ubyte{s}", (np.arange(n) % 10).astype(np.uint8))


@pytest.mark.parametrize("layout", ["plain", "gz", "parent"])
def test_smoke_main_on_idx_folder(tmp_path, layout):
    """--data-dir: the IDX files themselves (plain or .gz), or a parent folder (torchvision's
    MNIST/raw/)."""
    write_idx_folder(tmp_path / "MNIST" / "raw" if layout == "parent" else tmp_path / "mnist",
                     gz=layout == "gz")
    data = tmp_path if layout == "parent" else tmp_path / "mnist"
    res = lc.main(TINY + ["--methods", "erm,lc", "--ratios", "5", "--mix-pool", "global",
                          "--data-dir", str(data),
                          "--out", str(tmp_path / "o")])
    assert [r["dataset"] for r in res["runs"]] == [f"idx:{data.name}"] * 2
    # ~20 per class in 200 images, 5 % -> >= 1
    assert res["runs"][0]["n_conflicting"] >= 10


@pytest.mark.parametrize("bad", [["--ratios", "0"], ["--ratios", "100"], ["--ratios", "1,-2"],
                                 ["--ratios", "abc"], ["--methods", "erm,jtt"], ["--epochs", "x"],
                                 ["--mix-pool", "all"], ["--device", "tpu"], ["--q", "0"],
                                 ["--q", "1.5"], ["--lr", "-1e-3"], ["--lr-b", "-1"],
                                 ["--mlp", "cnn"], ["--epochs", "-1"], ["--decay-every", "-2"],
                                 ["--epoch", "2"], ["--threads", "-1"], ["--seeds", "1,-1"],
                                 ["--data-seed", "-1"], ["--n-train", "0"],
                                 ["--prior-momentum", "1"], ["--log-every", "-1"], ["--lr", "inf"],
                                 ["--n-train", "5"],                   # a class without images
                                 ["--ratios", "1"],         # 30 images per class: none conflicting
                                 ["--device", "cuda"], ["--device", "mps"], ["--out", "FILE"],
                                 ["--out", "READONLY"], ["--out", "BAD_RESULTS"],
                                 ["--report", "BAD_RESULTS"], ["--report", "MISSING"],
                                 ["--data-dir", "MISSING"], ["--data-dir", "CORRUPT"],
                                 ["--data-dir", "MISMATCH"]])
def test_bad_input_one_line_exit_2(tmp_path, capsys, bad):
    """One line on stderr, exit 2, no traceback, before any training; an earlier results.json stays
    byte-identical."""
    flag, case = bad
    if bad == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    if bad == ["--device", "mps"] and getattr(torch.backends, "mps",
                                              None) and torch.backends.mps.is_available():
        pytest.skip("MPS is present")
    if case == "READONLY" and os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder")
    d, out = tmp_path / "mnist", tmp_path / "out"
    write_idx_folder(d, gz=False)
    out.mkdir()
    earlier = json.dumps({"runs": [{"method": "erm", "note": "an earlier result"}]}).encode()
    if case == "MISSING":
        (d / "t10k-labels-idx1-ubyte").unlink()
    if case == "CORRUPT":
        raw = (d / "t10k-images-idx3-ubyte").read_bytes()
        (d / "t10k-images-idx3-ubyte").write_bytes(raw[:4] + b"\xff\xff\xff\xff" + raw[8:])
    if case == "MISMATCH":
        digits.write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    # not a results.json: refused, and left as it is
    if case == "BAD_RESULTS":
        earlier = b'{"runs": {"not": "a list"}}'
    (out / "results.json").write_bytes(earlier)
    if flag == "--data-dir":
        bad = [flag, str(d)]
    elif flag == "--report":
        bad = [flag, str(out / ("results.json" if case == "BAD_RESULTS" else "missing.json"))]
    # --out below a plain file cannot be created
    elif case == "FILE":
        bad, out = [], out / "results.json" / "sub"
    elif case in ("READONLY", "BAD_RESULTS"):
        bad = []
        out.chmod(0o555 if case == "READONLY" else 0o755)
    with pytest.raises(SystemExit) as e:
        lc.main(TINY + ["--ratios", "5"] + bad + ["--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("logit_correction.py: error:")
    assert "\n" not in err and "Traceback" not in err
    # earlier results intact
    assert (tmp_path / "out" / "results.json").read_bytes() == earlier
    assert not (tmp_path / "out" / "metrics.jsonl").exists()                   # nothing trained


def test_metrics_jsonl_one_record_per_epoch_and_run(tmp_path):
    res = lc.main(TINY + ["--methods", "erm,lc", "--ratios", "5", "--seeds", "1,2", "--out",
                          str(tmp_path)])
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"],
             r["epoch"]) for r in recs] == [(m, s, e) for s in (1, 2) for m in ("erm", "lc")
                                                                    for e in (1, 2)]
    key = res["runs"][0]["protocol"]
    for r in recs:
        run = next(x for x in res["runs"] if (x["method"], x["seed"]) == (r["method"], r["seed"]))
        h = run["history"][r["epoch"] - 1]
        # 300 images, batch 64
        assert r["protocol"] == key and r["ratio"] == 5.0 and r["step"] == r["epoch"] * 5
        assert r["loss"] == h["loss"] and r["val_unbiased"] == h["val_unbiased"]
        # LC's pseudo-attributes
        assert ("precision" in r and "recall" in r) == (r["method"] == "lc")
    last = [r for r in recs if r["epoch"] == 2]
    last_acc = {(x["method"], x["seed"]): x["unbiased_acc_last"] for x in res["runs"]}
    assert all(r["test_unbiased"] == pytest.approx(last_acc[r["method"], r["seed"]]) for r in last)
    lc.main(TINY + ["--methods", "erm,lc", "--ratios", "5", "--seeds", "1,2", "--out",
                    str(tmp_path)])
    # finished runs: skipped
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(recs)


def test_no_pictures_without_matplotlib(tmp_path, capsys, monkeypatch):
    # as if matplotlib were absent
    monkeypatch.setattr(lc, "pyplot", lambda: None)
    lc.main(TINY + ["--methods", "erm", "--ratios", "5", "--out", str(tmp_path)])
    assert "picture:" not in capsys.readouterr().out and not list(tmp_path.glob("*.png"))


def test_pictures_with_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    lc.main(TINY + ["--methods", "erm,lc", "--ratios", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("acc_vs_conflicting.png", "samples.png"):
        assert f"picture: {tmp_path / name}" in out
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_count_table_and_plot_with_a_stub_matplotlib(tmp_path):
    """The accuracy-vs-number-of-conflicting-images table; the plot runs against a stand-in pyplot
    (matplotlib itself is optional and not installed in CI)."""
    calls = []

    class Ax:
        def plot(self, xs, ys, *a, **k):
            calls.append((k.get("label"), list(xs), list(ys)))

        def set(self, **k):
            pass

        def legend(self):
            pass

    class Fig:
        def tight_layout(self):
            pass

        def savefig(self, path, **k):
            Path(path).write_text("png")

    plt = SimpleNamespace(subplots=lambda **k: (Fig(), Ax()), close=lambda fig: None)
    runs = [{"method": m, "ratio": r, "seed": s, "n_conflicting": n,
             "unbiased_acc_best_val": acc + s,
             "history": [{"precision": 100.0, "recall": 80.0}]}
            for m, acc in (("erm", 50.0), ("lc", 70.0)) for r,
            n in ((0.5, 280), (1.0, 550)) for s in (1, 2)]
    text = lc.count_table(runs)
    # mean over the two seeds
    assert "  0.5    280      51.50      71.50 100.0/ 80.0" in text
    assert lc.plot_acc_vs_conflicting(runs, str(tmp_path),
                                      plt) == str(tmp_path / "acc_vs_conflicting.png")
    assert (tmp_path / "acc_vs_conflicting.png").read_text() == "png"
    assert calls == [("erm", [280, 550], [51.5, 51.5]), ("lc", [280, 550], [71.5, 71.5])]

"""logit_correction.py: losses against hand-computed values, fast code against slow oracles, Group MixUp,
a smoke run of main(), determinism, and bad-input errors. CPU, seconds."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import logit_correction as lc  # noqa: E402
from data import digits  # noqa: E402

TINY = ["--threads", "1", "--n-train", "300", "--n-val", "100", "--n-test", "100", "--epochs", "2", "--batch-size", "64",
        "--log-every", "0"]


# ---------------------------------------------------------------------------------------------- losses

def test_lc_loss_equals_ce_when_prior_is_uniform():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    for c in (0.01, 0.37):                                # any constant column: ln c cancels in the softmax
        delta = torch.full((16, 10), c)
        assert torch.allclose(lc.lc_loss(logits, y, delta), F.cross_entropy(logits, y, reduction="none"), atol=1e-6)


def test_corrected_logits_shift_by_log_prior_exactly():
    torch.manual_seed(0)
    logits = torch.randn(8, 10, dtype=torch.float64)
    delta = torch.rand(8, 10, dtype=torch.float64) * 0.5 + 1e-3
    shift = lc.corrected_logits(logits, delta) - logits
    assert torch.allclose(shift, torch.log(delta), atol=1e-12, rtol=0)
    # by hand: raw logits (0, 0), prior column (0.9, 0.1), label 1 -> CE((ln .9, ln .1), 1) = -ln(0.1) = ln 10
    val = lc.lc_loss(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([[0.9, 0.1]]))
    assert val.item() == pytest.approx(math.log(10), abs=1e-6)
    # the floor: a zero prior entry becomes ln(eps), never -inf
    assert lc.corrected_logits(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), eps=1e-4)[0, 0].item() == pytest.approx(math.log(1e-4))


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
    assert torch.allclose(lc.gce_loss(z, y, q=1e-7), F.cross_entropy(z, y, reduction="none"), atol=1e-5)


def test_margins_against_loop():
    torch.manual_seed(0)
    z, y = torch.randn(20, 10), torch.randint(0, 10, (20,))
    slow = [z[i, y[i]].item() - max(z[i, k].item() for k in range(10) if k != y[i]) for i in range(20)]
    assert lc.margins(z, y).tolist() == pytest.approx(slow, abs=1e-6)


# ---------------------------------------------------------------------------------------------- group prior

def test_update_prior_against_counting_loop():
    torch.manual_seed(0)
    y, a = torch.randint(0, 10, (64,)), torch.randint(0, 10, (64,))
    prior = torch.full((10, 10), 0.01)
    slow = np.zeros((10, 10))
    for yi, ai in zip(y.tolist(), a.tolist()):
        slow[yi, ai] += 1 / 64
    new = lc.update_prior(prior, y, a, momentum=0.9)
    assert np.allclose(new.numpy(), 0.9 * 0.01 + 0.1 * slow, atol=1e-7)
    assert new.sum().item() == pytest.approx(1.0, abs=1e-6)              # stays a distribution


# ---------------------------------------------------------------------------------------------- Group MixUp

def test_group_mixup_partners_are_same_class_minority():
    y_N = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    a_mem = torch.tensor([0, 0, 3, 5, 1, 1, 1, 7, 2, 2])                # class 0: minority {2, 3}; class 1: none
    pools = lc.minority_pools(y_N, a_mem, C=10)
    assert pools[0].tolist() == [2, 3] and pools[1].tolist() == [] and pools[2].tolist() == [7]
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(10)
    for _ in range(20):
        j = lc.pick_partners(y_N[idx], idx, pools, gen)
        assert (y_N[j] == y_N[idx]).all()                               # same class, always
        for i in range(10):
            if len(pools[y_N[i]]):
                assert a_mem[j[i]] != y_N[i]                            # a (pseudo-)minority partner
            else:
                assert j[i] == i                                        # no minority yet: itself, a no-op mix


def test_group_mixup_batch_pools_fall_back_to_same_class():
    """--mix-pool batch (official code): minority partners come from the batch; a class without a pseudo-minority
    sample in the batch is mixed with a random same-class sample of the batch."""
    idx = torch.tensor([10, 11, 12, 13, 14, 15, 16])                    # training-set indices of the batch
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    a_hat = torch.tensor([0, 0, 4, 1, 1, 2, 2])                         # only class 0 has a pseudo-minority (12)
    pools = [idx[m] for m in lc.minority_pools(y, a_hat, C=10)]
    assert pools[0].tolist() == [12] and all(len(p) == 0 for p in pools[1:])
    gen = torch.Generator().manual_seed(0)
    pos = {int(i): b for b, i in enumerate(idx)}
    for _ in range(20):
        j = lc.pick_partners(y, idx, pools, gen, fallback="class")
        assert j[:3].tolist() == [12, 12, 12]                           # class 0: always its minority sample
        assert all(y[pos[int(jj)]] == y[b] for b, jj in enumerate(j))   # every partner in the batch, same class
        assert sorted(j[3:5].tolist()) == [13, 14] and sorted(j[5:].tolist()) == [15, 16]   # a within-class shuffle


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
    x_mix, d_mix = lc.group_mixup(torch.ones(B, 3), torch.zeros(B, 3), torch.ones(B, 10), torch.zeros(B, 10), lam)
    assert torch.allclose(x_mix[:, 0], lam) and torch.allclose(d_mix[:, 0], lam)


# ---------------------------------------------------------------------------------------------- evaluation

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
    assert got["aligned"] == pytest.approx(100 * (pred[al] == y[al]).float().mean().item(), abs=1e-4)
    assert got["conflicting"] == pytest.approx(100 * (pred[~al] == y[~al]).float().mean().item(), abs=1e-4)


# ---------------------------------------------------------------------------------------------- main()

REQUIRED = {"method", "ratio", "seed", "dataset", "unbiased_acc_last", "unbiased_acc_best_val", "aligned_acc",
            "conflicting_acc", "worst_group_acc", "epochs"}


def test_smoke_main_all_methods_and_determinism(tmp_path):
    args = TINY + ["--methods", ",".join(lc.METHODS), "--ratios", "5", "--seeds", "3", "--margins"]
    res = lc.main(args + ["--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["complete"] is True and len(saved["runs"]) == len(lc.METHODS)
    assert {r["method"] for r in saved["runs"]} == set(lc.METHODS)
    for r in saved["runs"]:
        assert REQUIRED <= set(r) and r["dataset"] == "procedural" and r["epochs"] == 2
        assert 0 <= r["unbiased_acc_best_val"] <= 100 and 0 <= r["worst_group_acc"] <= r["unbiased_acc_best_val"]
    ck = torch.load(tmp_path / "a" / "ckpt" / "lc_r5_s3.pt", weights_only=True)
    net = lc.mlp()
    net.load_state_dict(ck["best_val"])
    assert not any(k.startswith("_orig_mod.") for k in ck["last"])
    # same seed, same numbers (CPU)
    res2 = lc.main(args + ["--out", str(tmp_path / "b")])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]
    assert strip(res["runs"]) == strip(res2["runs"])


def test_smoke_main_on_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 260), ("t10k", 80)):
        digits.write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        digits.write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    res = lc.main(TINY + ["--epochs", "2", "--methods", "erm,lc", "--mix-pool", "global", "--data-dir", str(tmp_path),
                          "--out", str(tmp_path / "o")])
    assert [r["dataset"] for r in res["runs"]] == [f"idx:{tmp_path.name}"] * 2


@pytest.mark.parametrize("bad", [["--ratios", "0"], ["--ratios", "100"], ["--ratios", "1,-2"], ["--ratios", "abc"],
                                 ["--methods", "erm,jtt"], ["--epochs", "x"], ["--mix-pool", "all"],
                                 ["--data-dir", "MISSING"],
                                 ["--data-dir", "CORRUPT"], ["--data-dir", "MISMATCH"]])
def test_bad_input_one_line_exit_2(tmp_path, capsys, bad):
    d = tmp_path / "mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        digits.write_idx(d / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        digits.write_idx(d / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))
    if bad[-1] == "MISSING":
        (d / "t10k-labels-idx1-ubyte").unlink()
    if bad[-1] == "CORRUPT":
        raw = (d / "t10k-images-idx3-ubyte").read_bytes()
        (d / "t10k-images-idx3-ubyte").write_bytes(raw[:4] + b"\xff\xff\xff\xff" + raw[8:])
    if bad[-1] == "MISMATCH":
        digits.write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    if bad[0] == "--data-dir":
        bad = ["--data-dir", str(d)]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        lc.main(TINY + bad + ["--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("logit_correction.py: error:") and "\n" not in err and "Traceback" not in err
    assert not (out / "results.json").exists()                           # nothing that looks like a result

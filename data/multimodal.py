"""What the two multimodal paper files share around the shapes world (data/shapes.py): loading it
with its data-only baselines, exact-match scoring, the input checks both make, the frozen-LM cache
(keyed by the code that builds the LM and the thread count), the gates a frozen backbone must pass
before bridges train on it, bridge checkpoints, and the training-memory estimate. The flags both
files share are described once, in SHARED_HELP. Nothing here is paper-specific, and nothing here
imports a paper file."""

import ast
import hashlib
import inspect
import json
import math
import os
import textwrap
import time
from dataclasses import asdict

import numpy as np
import torch

from data.layers import LAYER_CODE
from data.run import BadInput, Stopped, pick_device, set_threads, writable_dirs
from data.shapes import QUESTION_TYPES, ShapesDataError, baselines, generate, load_world

# the help of the flags both multimodal files share, said once (their Configs use it)
SHARED_HELP = dict(
    n_train="training scenes (procedural world)",
    data_dir="real data: DIR/images.npy (N,S,S,3) uint8 + DIR/annotations.jsonl (data/shapes.py)",
    patch="ViT patch size", vit_dim="ViT width C", vit_layers="ViT blocks",
    vit_steps="ViT pretraining steps",
    lm_scenes="fresh text-only scenes for LM pretraining", lm_lr="LM pretraining learning rate",
    seeds="comma-separated seeds of the bridge runs (the world and frozen backbones use seed 0 "
          "unless --vary-backbones)",
    vary_backbones="each seed also re-draws the world's training scenes and retrains both frozen "
                   "backbones, so mean +- std includes their variance",
    ignore_gates="train bridges even on a backbone that fails its gate (for study; the verdicts "
                 "then measure the backbone)",
    device="auto: CUDA, then MPS, then CPU", dtype="bfloat16: autocast (opt-in)",
    threads="torch's CPU threads (0 = torch's default, one per physical core)",
    quick="a tiny config that prints every section in under a minute",
    out="output folder: results.json, metrics.jsonl, bridge checkpoints (earlier ones move to "
        "previous_<k>/), PNGs (with matplotlib)")


def shapes_world(cfg):
    """The data of both multimodal files -> (split -> dataset dict, vocabulary): world v2 or
    --data-dir (data/shapes.py); a data error is a BadInput."""
    try:
        return load_world(cfg.data_dir, cfg.n_train, cfg.n_eval, cfg.image_size, cfg.patch,
                          cfg.batch_size)
    except ShapesDataError as e:
        raise BadInput(str(e))


def shapes_baselines(world, cfg):
    """The data-only baselines on test and hold-out (where there are scenes), their tables fitted on
    the
    --data-dir train split or on fresh scenes (not the training ones)."""
    ref = (world["train"] if cfg.data_dir
           else generate(min(20_000, 4 * cfg.n_train), "train", seed=1000, images=False))
    return {s: baselines(world[s], ref=ref) for s in ("test", "holdout") if world[s]["captions"]}



def validate_image_and_run(cfg, encoder_batch):
    """Checks shared by the multimodal paper files (data size, image, dtype, data, seeds), then
    --threads,
    --device and the output folders, all before any work -> the list of seeds. encoder_batch: the
    shared ViT's pretraining batch, which --n-train must fill too."""
    if not cfg.data_dir and cfg.n_train < max(cfg.batch_size, encoder_batch):
        raise BadInput(f"--n-train {cfg.n_train} must fill a batch (--batch-size, and the "
                       f"encoder's {encoder_batch})")
    if cfg.image_size < 12:
        raise BadInput(f"--image-size must be at least 12, got {cfg.image_size}")
    if cfg.image_size % cfg.patch:
        raise BadInput(f"--image-size {cfg.image_size} must be a multiple of --patch {cfg.patch}")
    m = int(round(math.sqrt(cfg.image_tokens)))
    if m * m != cfg.image_tokens or m > cfg.image_size // cfg.patch:
        raise BadInput(f"--image-tokens must be a square number <= the patch grid "
                       f"({(cfg.image_size // cfg.patch) ** 2})")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise BadInput(f"--dtype: expected float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.data_dir and not os.path.isdir(cfg.data_dir):
        raise BadInput(f"--data-dir {cfg.data_dir}: no such directory")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise BadInput(f"--seeds must be comma-separated integers, got {cfg.seeds!r}")
    set_threads(cfg.threads)
    pick_device(cfg.device)
    writable_dirs(out=cfg.out, cache_dir=cfg.cache_dir)
    return seeds


@torch.no_grad()
def exact_match(predict, items, bs):
    """Exact match of one-word answers, overall and per question type (in QUESTION_TYPES order), in
    chunks of bs items: (scene index, prompt, answer id, type); predict(chunk of items) -> predicted
    ids (B,)."""
    hit = {}
    for i in range(0, len(items), bs):
        chunk = items[i:i + bs]
        for (_, _, a, t), p in zip(chunk, predict(chunk).tolist()):
            hit.setdefault(t, []).append(p == a)
    order = {t: k for k, t in enumerate(QUESTION_TYPES)}
    per_type = {t: float(np.mean(hit[t]))
                for t in sorted(hit, key=lambda t: order.get(t, len(order)))}
    return float(np.mean([x for v in hit.values() for x in v])), per_type


def step_memory_mib(step_fn, params, device):
    """Training memory of one step (MiB). CUDA: max allocated. CPU (no allocator statistics there):
    an estimate = every storage autograd saves for the backward pass (counted once, via
    saved_tensors_hooks) + 3x the trainable parameters (their gradients and two AdamW moments).
    Comparable between variants."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_fn()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    seen = {}

    def keep(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        step_fn()
    return (sum(seen.values()) + 3 * sum(p.numel() * p.element_size() for p in params)) / 2 ** 20


def hash_str(s):
    """A stable (process-independent) string hash for cache file names."""
    h = 1469598103934665603
    for ch in s.encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return h


def code_digest(obj):
    """What a function, class or module computes, not how it is written: its syntax tree without
    docstrings, comments, line breaks or positions. So rewording a docstring or re-wrapping a line
    keeps a cached backbone; any change to a statement retrains it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def build_key(*code):
    """What decides how a frozen backbone comes out besides its config: the code (code_digest) of
    the functions, classes or modules that build and train it, and the CPU thread count (float
    summation order: the same recipe can land on either side of a plateau with 1 or 2 threads). Part
    of every backbone cache key, so that a backbone built by other code or with other threads is
    trained anew, never reused silently."""
    src = "".join(code_digest(c) for c in code)
    return f"code={hashlib.sha1(src.encode()).hexdigest()[:12]}_threads={torch.get_num_threads()}"


def cached_lm(world, vocab, cfg, keys, name, make, train, device, code=()):
    """A frozen LM: loaded from cfg.cache_dir when one with this config (`keys` of cfg), vocabulary,
    corpus and build (build_key of `code`, plus the shared layers and training loop) exists, else
    train() and saved there. The corpus is the --data-dir train split, or stands for the procedural
    generator (its first 50 captions). make() -> a fresh module to load into."""
    corpus = json.dumps(vocab) + (
        "\n".join(world["train"]["captions"]) + json.dumps(world["train"]["qa"]) if cfg.data_dir
        else "".join(generate(50, "train", seed=7, images=False)["captions"]))
    build = build_key(*code, *LAYER_CODE)
    key = corpus + str([getattr(cfg, k) for k in keys]) + build
    tag = hashlib.sha1(key.encode()).hexdigest()[:16]
    path = os.path.join(cfg.cache_dir, f"{name}_{tag}.pt")
    if os.path.exists(path):
        lm = make().to(device)
        ck = torch.load(path, map_location=device, weights_only=True)
        # caches from before the config was stored: bare
        lm.load_state_dict(ck["model"] if "config" in ck else ck)
        print(f"frozen LM: loaded {path}")
        return lm.eval()
    t = time.perf_counter()
    lm = train()
    torch.save(dict(model=lm.state_dict(), config={k: getattr(cfg, k) for k in keys}, vocab=vocab,
                    build=build),
               path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"frozen LM: pretrained in {time.perf_counter() - t:.0f}s, saved {path}")
    return lm.eval()


class GateFailed(Stopped):
    """A frozen backbone failed its gate: the run stops before training bridges on it (exit status
    3)."""


def gate_or_stop(cfg, passed, line):
    """Print a backbone's gate line; when it fails, stop the run (GateFailed) unless --ignore-gates
    (for study) or --quick (whose tiny backbones cannot pass: it reports and goes on)."""
    print(line)
    if not passed and not (cfg.ignore_gates or cfg.quick):
        raise GateFailed(f"a frozen backbone failed its gate ({line}); bridges trained on it "
                         f"would measure the backbone, not the method (--ignore-gates trains them "
                         f"anyway, for study)")


def backbone_seed(cfg, seed):
    """The seed of the world's training scenes and the frozen backbones for bridge seed `seed`: the
    seed itself with --vary-backbones, else 0 (then --seeds varies the bridges only)."""
    return seed if cfg.vary_backbones else 0


def text_ceiling_line(ceiling, gate):
    """The frozen LM's gate, {question type: accuracy given the true caption} -> one printable
    line."""
    return (f"frozen LM text ceiling (true caption as context; gate >= {gate} per type): "
            + ", ".join(f"{t} {v:.3f}" for t, v in ceiling.items())
            + f" -> {'PASS' if min(ceiling.values()) >= gate else 'FAIL'}")


def save_bridge(cfg, tag, model, vocab, **extra):
    """<out>/bridge_<tag>.pt (keep_previous moves these aside on a rerun): the trained weights with
    the config and vocabulary that rebuild them, plain data that torch.load(..., weights_only=True)
    reads."""
    torch.save(dict(model=model.state_dict(), config=asdict(cfg), vocab=vocab, **extra),
               os.path.join(cfg.out, f"bridge_{tag}.pt"))


"""What the two multimodal paper files share around the shapes world (data/shapes.py): loading it
with its data-only baselines, exact-match scoring, the input checks both make, the frozen-LM cache
(keyed by the code that builds the LM and the thread count), the gates a frozen backbone must pass
before bridges train on it, bridge checkpoints, and what a training step costs. The flags both
files share are declared once, in MultimodalConfig. Nothing here is paper-specific, and nothing here
imports a paper file."""

import ast
import hashlib
import inspect
import json
import math
import os
import textwrap
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from data.layers import LAYER_CODE
from data.run import (BadInput, Stopped, autocast, flag, interleaved_ms, mean_std, need,
                      parse_seeds, pick_device, set_threads, writable_dirs)
from data.shapes import QUESTION_TYPES, ShapesDataError, baselines, generate, load_world

DATA, BACKBONES, BRIDGE, EXPERIMENT = "data", "frozen backbones", "bridge", "experiment"


@dataclass
class MultimodalConfig:
    """The flags both multimodal files share, declared once: each file's Config subclasses this and
    adds its own. A file may re-declare a field to change its help or default; the field keeps its
    place here. The field order is --help's group order (data/run.parse_flags groups by first
    appearance): data, frozen backbones, the bridge (batch_size opens the group that a file's own
    bridge flags join), experiment, run."""
    n_train: int = flag(6000, "training scenes (procedural world)", DATA)
    n_eval: int = flag(500, "val / test / hold-out scenes (about 5 questions each)", DATA)
    image_size: int = flag(48, "image side in pixels (the ViT is pretrained at this size)", DATA)
    data_dir: str = flag("", "real data: DIR/images.npy (N,S,S,3) uint8 + DIR/annotations.jsonl "
                         "(data/shapes.py)", DATA)
    patch: int = flag(8, "ViT patch size", BACKBONES)
    vit_dim: int = flag(64, "ViT width C", BACKBONES)
    vit_layers: int = flag(4, "ViT blocks", BACKBONES)
    vit_steps: int = flag(400, "ViT pretraining steps", BACKBONES)
    image_tokens: int = flag(9, "ViT tokens the bridge reads (a square; the patch grid is "
                             "average-pooled; 9 = one per cell)", BACKBONES)
    d_model: int = flag(64, "LM width", BACKBONES)
    n_head: int = flag(4, "attention heads (all models)", BACKBONES)
    lm_mix: int = flag(3, "Primer's conv width in every LM block (1 = off)", BACKBONES)
    lm_scenes: int = flag(50_000, "fresh text-only scenes for LM pretraining", BACKBONES)
    lm_lr: float = flag(3e-3, "LM pretraining learning rate", BACKBONES)
    batch_size: int = flag(64, "batch size of the bridge stages", BRIDGE)
    seeds: str = flag("0", "comma-separated seeds of the bridge runs (the world and frozen "
                      "backbones use seed 0 unless --vary-backbones)", EXPERIMENT)
    vary_backbones: bool = flag(False, "each seed also re-draws the world's training scenes and "
                                "retrains both frozen backbones, so mean +- std includes their "
                                "variance", EXPERIMENT)
    ignore_gates: bool = flag(False, "train bridges even on a backbone that fails its gate (for "
                              "study; the verdicts then measure the backbone)", EXPERIMENT)
    device: str = flag("auto", "auto: CUDA, then MPS, then CPU", "run",
                       ("auto", "cpu", "cuda", "mps"))
    dtype: str = flag("float32", "bfloat16: autocast (opt-in)", "run", ("float32", "bfloat16"))
    compile: bool = flag(False, "torch.compile the LM blocks (opt-in)", "run")
    threads: int = flag(0, "torch's CPU threads (0 = torch's default, one per physical core)",
                        "run")
    quick: bool = flag(False, "a tiny config that prints every section in under a minute", "run")
    cache_dir: str = flag(os.path.join("out", "cache"), "frozen backbones (the shared ViT, the "
                          "LM), reused by every later run", "run")


def out_flag(name):
    """The --out field of a file's Config: the folder out/<name>."""
    return flag(os.path.join("out", name), "output folder: results.json, metrics.jsonl, bridge "
                "checkpoints (earlier ones move to previous_<k>/), PNGs (with matplotlib)", "run")


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
    """Checks shared by the multimodal paper files (widths, data size, image, dtype, data, seeds),
    then --threads, --device and the output folders, all before any work -> the list of seeds.
    encoder_batch: the shared ViT's pretraining batch, which --n-train must fill too."""
    # heads split the widths; rope rotates pairs in each LM head, the 2-D sin-cos fills C in fours
    need(not (cfg.d_model % (2 * cfg.n_head) or cfg.vit_dim % cfg.n_head or cfg.vit_dim % 4),
         "--d-model must be a multiple of 2 x --n-head, --vit-dim of --n-head and of 4")
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
    seeds = parse_seeds(cfg.seeds, 0)
    set_threads(cfg.threads)
    pick_device(cfg.device)
    writable_dirs(out=cfg.out, cache_dir=cfg.cache_dir)
    return seeds


def compile_blocks(cfg, blocks):
    """--compile: torch.compile each block in place, so parameter names (and checkpoints) keep no
    _orig_mod. prefix."""
    if cfg.compile:
        for b in blocks:
            b.compile()


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


def oracle_cell(xs, key, ref):
    """A score's table cell: mean ± sample std over seeds (None skipped), with '*' when the mean is
    at or below the bag-of-words oracle's (ref: data/shapes.oracle_reference): the caption's words
    alone, without binding, score as much."""
    xs = [x for x in xs if x is not None]
    return mean_std(xs) + ("*" if xs and key in ref and np.mean(xs) <= ref[key] else "")


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


def training_step_costs(models, loss, cfg, device, rounds):
    """What one training step of each model costs, on the same batches: mem_mib, its training memory
    (step_memory_mib); fwd_bwd_ms, forward and backward; step_ms, a whole training step (forward,
    backward, clipping, AdamW). The models take turns, so that a busy spell of the machine hits
    them alike, and each time is the median of the rounds (data/run.interleaved_ms). models: {name:
    module}; loss(name, r): that model's loss on batch r. -> {name: {mem_mib, fwd_bwd_ms, step_ms}}.
    """
    out = {}
    for v, m in models.items():
        with autocast(cfg, device):
            out[v] = dict(mem_mib=step_memory_mib(lambda: loss(v, 0).backward(),
                                                  list(m.parameters()), device))
        m.zero_grad(set_to_none=True)
    # lr 0: a training step's work (AdamW computes its update and adds 0 x it), weights unchanged
    opts = {v: torch.optim.AdamW(m.parameters(), lr=0.0, weight_decay=0.01)
            for v, m in models.items()}

    def fwd_bwd(v, r):
        with autocast(cfg, device):
            loss(v, r).backward()
        models[v].zero_grad(set_to_none=True)

    def train_step(v, r):                                 # as one step of data/layers.train_loop
        with autocast(cfg, device):
            value = loss(v, r)
        value.backward()
        torch.nn.utils.clip_grad_norm_(list(models[v].parameters()), 1.0)
        opts[v].step()
        opts[v].zero_grad(set_to_none=True)

    for key, fn in (("fwd_bwd_ms", fwd_bwd), ("step_ms", train_step)):
        ms = interleaved_ms({v: lambda r, v=v, fn=fn: fn(v, r) for v in models}, device, rounds)
        for v in models:
            out[v][key] = ms[v]
    return out


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


def backbone_world(cfg, world, vocab, seed):
    """The world a backbone of seed `seed` trains on: for seed > 0 (procedural world only) its
    training scenes re-drawn with that seed, the rest of the world kept."""
    if not seed or cfg.data_dir:
        return world
    world = dict(world, train=generate(cfg.n_train, "train", seed=seed, size=cfg.image_size))
    unknown = {w for t in world["train"]["captions"] for w in t.split()} - set(vocab)
    if unknown:            # world v2's words are a closed set: more training scenes never add one
        raise ValueError(f"training scenes of seed {seed} use words outside the vocabulary: "
                         f"{sorted(unknown)}")
    return world


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


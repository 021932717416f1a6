"""The run harness all four paper files (and kernels/bench.py) share: the habits a user meets in
each of them, written once. Nothing here is paper-specific, and nothing here imports a paper file.

  flags       flag() declares a Config field that is also a --flag (default, help, group, choices
              on one line); parse_flags() builds the command line from the dataclass, with presets
              (--quick, --preset gpu, --sweep) that the flags given explicitly override.
  errors      BadInput: one line on stderr, exit status 2, before any work; Stopped: exit status 3
              (a run that refuses to go on, e.g. a frozen backbone that failed its gate). main()
              maps both.
  machine     --device, --threads, bf16 autocast.
  output      progress lines, metrics.jsonl, results.json written atomically, earlier results
              moved aside (never replaced), runs keyed by their protocol, mean ± sample std, tables
              over seeds, the Hungarian matching, figures when matplotlib is importable.
  runs        checkpoints that carry their config, finished runs reused, a pool of worker processes.
  timing      one statistic: the median of interleaved rounds.
  torchrun    set-up and tear-down of the process group, the one all-reduce, rank 0 speaking for
              all.
"""

import argparse
import datetime
import hashlib
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext, redirect_stderr
from dataclasses import asdict, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm


class BadInput(ValueError):
    """A user error: one line on stderr, exit status 2."""


class Stopped(RuntimeError):
    """A run that stops on purpose after a check (exit status 3), e.g. a frozen backbone below its
    gate."""


# --------------------------------------------------------------------------------------------------
# Flags: one flag() per Config field; presets under the flags given
# --------------------------------------------------------------------------------------------------

def flag(default, help, group="run", choices=None, const=None):
    """A Config field that is also a --flag: its help text (None: hidden from --help, for tests),
    its --help group, its choices, and for a str flag that may be given bare, the value it then
    takes (const)."""
    return field(default=default,
                 metadata=dict(help=help, group=group, choices=choices, const=const))


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors (unknown or abbreviated flag, bad value) as one line and exit
    status 2, like every other input error, instead of the usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def examples(doc):
    """The 'python ...' / 'torchrun ...' lines of a docstring: --help's epilog, so examples are
    written once."""
    lines = [ln[2:] if ln.startswith("  ") else ln for ln in doc.splitlines()
             if ln.lstrip().startswith(("python ", "torchrun "))]
    return "\n".join(["examples:"] + lines) if lines else None


def parse_flags(cls, argv, prog, doc, presets=(), epilog=None):
    """argv -> cls(...): one --flag per field of the dataclass cls (declared with flag()), in --help
    groups in field order, each help ending in its default. A bool is a switch, --x/--no-x where a
    preset sets it (so the preset's value can be undone). presets: [(field, value, {field: value,
    ...})]: where `field` is `value` (as given, or by default) the overrides apply, later presets
    over earlier ones; the flags given on the command line always win. Order: defaults < presets <
    flags given."""
    ap = OneLineParser(prog=prog, description=doc.strip().split("\n\n")[0], allow_abbrev=False,
                       epilog=examples(doc) if epilog is None else epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    preset_keys = {k for _, _, over in presets for k in over}
    groups = {}
    for f in fields(cls):
        m = f.metadata
        if m["group"] not in groups:
            groups[m["group"]] = ap.add_argument_group(m["group"])
        g = groups[m["group"]]
        name, kw = "--" + f.name.replace("_", "-"), dict(default=argparse.SUPPRESS)
        if m["help"] is None:
            kw["help"] = argparse.SUPPRESS
        elif isinstance(f.default, bool):
            kw["help"] = m["help"]
        else:
            shown = f.default if f.default != "" else "-"
            bare = f"; bare {name}: {m['const']}" if m["const"] else ""
            kw["help"] = m["help"] + bare + f" (default: {shown})"
        if isinstance(f.default, bool):
            action = argparse.BooleanOptionalAction if f.name in preset_keys else "store_true"
            g.add_argument(name, action=action, **kw)
        else:
            g.add_argument(name, type=type(f.default), choices=m["choices"],
                           **(dict(nargs="?", const=m["const"]) if m["const"] else {}), **kw)
    given = vars(ap.parse_args(argv))
    values = {f.name: f.default for f in fields(cls)}
    for on, value, over in presets:
        if given.get(on, values[on]) == value:
            values.update(over)
    return cls(**{**values, **given})


def parse_list(s, typ, name):
    """'1,2,3' -> [typ(v), ...]; a BadInput naming --name when a value does not parse or the list is
    empty."""
    try:
        vals = [typ(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--{name}: cannot parse {s!r} as a comma list of {typ.__name__}") from None
    if not vals:
        raise BadInput(f"--{name}: empty list")
    return vals


def parse_seeds(text, default):
    """--seeds '0,1,2' -> [0, 1, 2]; '' -> [default]; a BadInput when one is not an integer."""
    try:
        return [int(s) for s in text.split(",")] if text else [default]
    except ValueError:
        raise BadInput(f"--seeds must be comma-separated integers, got {text!r}") from None


def need(ok, msg):
    """A check of the input: a BadInput(msg) unless ok."""
    if not ok:
        raise BadInput(msg)


def check_numbers(cfg, positive, at_least_0=()):
    """Each named Config field must be positive (at_least_0: >= 0, where 0 skips that training) and
    finite; the first that is not is a BadInput, fields in the order given (at_least_0 first)."""
    for f in at_least_0 + positive:
        v = getattr(cfg, f)
        if not (v >= 0 if f in at_least_0 else v > 0) or v == math.inf:     # "not": a NaN fails too
            need = ((">= 0" if f in at_least_0 else "positive")
                    + (" and finite" if v == math.inf else ""))
            raise BadInput(f"--{f.replace('_', '-')} must be {need}, got {v}")


def main(prog, run_fn, *args):
    """run_fn(*args), with a BadInput as one line on stderr and exit status 2, a Stopped as one line
    and 3."""
    try:
        return run_fn(*args)
    except BadInput as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        sys.exit(3)


# --------------------------------------------------------------------------------------------------
# Machine: device, threads, autocast
# --------------------------------------------------------------------------------------------------

def pick_device(name):
    """--device auto | cpu | cuda | mps -> a torch.device; a BadInput (checked before any work) when
    the asked one is not on this machine."""
    mps = getattr(torch.backends, "mps", None)
    mps = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise BadInput(f"--device: expected auto, cpu, cuda or mps, got {name!r}")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not mps):
        raise BadInput(f"--device {name}: {name.upper()} is not available on this machine")
    return torch.device(name)


def set_threads(n):
    """--threads, one meaning in every file: torch's CPU threads in this process; 0 keeps torch's
    default (one per physical core). Thread count can change float summation order, so docs name the
    count they used."""
    if n < 0:
        raise BadInput(f"--threads must be >= 0 (0 = torch's default), got {n}")
    if n:
        torch.set_num_threads(n)


def autocast(cfg, device):
    """bf16 autocast when cfg.dtype is bfloat16, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


# --------------------------------------------------------------------------------------------------
# Output: progress, metrics, results kept across reruns, statistics, figures
# --------------------------------------------------------------------------------------------------

class progress:
    """A tqdm bar when stderr is a terminal; into a pipe or a log file (where a bar's carriage
    returns pile up) one plain line every ~10 % instead. Iterate over it like tqdm;
    set_postfix(**kw) shows the latest numbers in both forms. quiet: nothing at all (short loops,
    ranks other than 0)."""

    def __init__(self, iterable, desc, total=None, initial=0, quiet=False, lines=10):
        self.total = len(iterable) + initial if total is None else total
        self.tty, self.quiet, self.desc = sys.stderr.isatty(), quiet, desc
        self.initial, self.post = initial, {}
        self.every = max(1, -(-(self.total - initial) // lines))
        self.bar = tqdm(iterable, desc=desc, total=self.total, initial=initial, leave=False,
                        dynamic_ncols=True, disable=quiet or not self.tty)

    def __iter__(self):
        t0 = time.perf_counter()
        for i, x in enumerate(self.bar, self.initial + 1):
            yield x                                 # the loop body runs here; then its line, if due
            due = (i - self.initial) % self.every == 0 or i == self.total
            if not (self.tty or self.quiet) and due:
                post = "".join(f" {k}={v}" for k, v in self.post.items())
                print(f"{self.desc}: {i}/{self.total} {time.perf_counter() - t0:.0f}s{post}",
                      file=sys.stderr, flush=True)

    def set_postfix(self, **kw):
        self.post = kw
        self.bar.set_postfix(**kw)

    def close(self):
        self.bar.close()


def log_metrics(path, **record):
    """metrics.jsonl: one JSON record per line, appended and flushed as training goes (a rerun adds
    lines, an interrupted run keeps what it logged)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path, obj):
    """Atomically: a crash mid-write never leaves a truncated file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def write_results(out, res, keep=False):
    """<out>/results.json, atomically (rewritten after every run, so an interrupted sweep keeps what
    it had). keep: first move an earlier one aside (keep_previous), as a rerun that is not a resume
    does."""
    if keep:
        keep_previous(out)
    write_json(os.path.join(out, "results.json"), res)


def writable_dirs(**dirs):
    """Output folders (flag name -> path), created before any work; a BadInput if one cannot be
    created or written to, so a run never trains for minutes and then fails to save."""
    for name, d in dirs.items():
        flag_name = "--" + name.replace("_", "-")
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            raise BadInput(f"{flag_name} {d}: cannot create it ({e.strerror})")
        if not os.access(d, os.W_OK):
            raise BadInput(f"{flag_name} {d}: not writable")


def keep_previous(out, also=None):
    """Reruns never silently replace results: an earlier results.json, its checkpoints (bridge_*.pt)
    and the entries `also(name)` picks (a file's run folders, figures) move to previous_<k>/."""
    old = [f for f in os.listdir(out)
           if f == "results.json" or (f.startswith("bridge_") and f.endswith(".pt"))
           or (also is not None and not f.startswith("previous_") and also(f))]
    if old:
        k = 1 + sum(d.startswith("previous_") for d in os.listdir(out))
        os.makedirs(os.path.join(out, f"previous_{k}"))
        for f in old:
            os.replace(os.path.join(out, f), os.path.join(out, f"previous_{k}", f))
        print(f"earlier results moved to {os.path.join(out, f'previous_{k}')}")


def print_outputs(figure_paths, out, wall_s):
    """The last lines of a run: its figures, then where results.json is and how long the run took.
    """
    for path in figure_paths:
        print(f"figure: {path}")
    print(f"results: {os.path.join(out, 'results.json')} ({wall_s:.0f} s)")


def protocol_key(protocol):
    """8 hex digits of the SHA-1 of the settings (a dict), independent of their order: runs are
    keyed by it."""
    return hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:8]


def load_results(path):
    """The results.json at path ({"runs": []} when there is none yet); a BadInput when it is not
    one."""
    if not os.path.exists(path):
        return {"runs": []}
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path} exists but is not readable JSON ({e}); move it away") from None
    if not isinstance(res, dict) or not isinstance(res.get("runs"), list):
        raise BadInput(f"{path} exists but is not a results.json (no list of runs); move it away")
    return res


def by_protocol(res):
    """(key, its settings, its runs) for each protocol that results.json holds runs of, in key
    order."""
    for key in sorted({r.get("protocol") for r in res["runs"]}, key=str):
        runs = [r for r in res["runs"] if r.get("protocol") == key]
        yield key, res.get("protocols", {}).get(key, {}), runs


def mean_sd(xs):
    """(mean, sample std with ddof = 1) over seeds; the std is None for a single value. The one
    convention."""
    xs = [float(x) for x in xs if x is not None]
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None)


def mean_std(xs, spec=".3f"):
    """'mean ± sample std (ddof=1)' over seeds; '-' when there is nothing."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m, sd = mean_sd(xs)
    return format(m, spec) + (f" ± {format(sd, spec)}" if sd is not None else "")


def table_rows(runs, cols, key="name"):
    """One row per configuration (runs[key], in first-seen order): (name, seeds, cells), a cell
    'mean ± sample std' over its seeds for each column (field, title, format spec)."""
    rows = []
    for n in dict.fromkeys(r[key] for r in runs):
        rs = [r for r in runs if r[key] == n]
        rows.append((n, len(rs), [mean_std([r.get(f) for r in rs], spec) for f, _, spec in cols]))
    return rows


def table(runs, cols, header=True, width=16):
    """The rows of table_rows as text: a header line (unless header=False), then one line per
    configuration."""
    head = f"{'run':<18}{'seeds':>6}" + "".join(f"{title:>{width}}" for _, title, _ in cols)
    lines = [head, "-" * len(head)] if header else []
    lines += [f"{n:<18}{k:>6}" + "".join(f"{c:>{width}}" for c in cells)
              for n, k, cells in table_rows(runs, cols)]
    return "\n".join(lines)

def linear_probe(x_tr, y_tr, x_te, y_te, ridge=1e-2):
    """A linear read-out fitted in closed form (ridge regression onto one-hot labels, standardised
    features), scored by argmax on held-out rows -> accuracy."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a = torch.cat([(x_tr - mu) / sd, torch.ones(len(x_tr), 1)], 1).double()
    y = F.one_hot(y_tr, int(max(y_tr.max(), y_te.max())) + 1).double()
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    b = torch.cat([(x_te - mu) / sd, torch.ones(len(x_te), 1)], 1).double()
    return float(((b @ w).argmax(1) == y_te).float().mean())


def hungarian(cost):
    """Minimum-cost perfect matching on a square matrix (Kuhn-Munkres, O(n^3) potentials form).
    Returns perm with perm[row] = column."""
    n = cost.shape[0]
    INF = float("inf")
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    p, way = np.zeros(n + 1, dtype=int), np.zeros(n + 1, dtype=int)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = np.full(n + 1, INF), np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    perm = np.zeros(n, dtype=int)
    for j in range(1, n + 1):
        perm[p[j] - 1] = j - 1
    return perm


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None: matplotlib is optional, and without
    it the paper files print what they always printed and save no PNG. Imported here, on first use,
    not at start."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(plt, fig, path):
    """Write a figure as a PNG and free it (plt: what pyplot() returned). -> path."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap(mat, rows, cols, title):
    """A terminal heat map: one shade character per cell, values printed to the right."""
    shades = " .:-=+*#%@"
    lo, hi = float(np.min(mat)), float(np.max(mat))
    pad = " " * (1 + max([5, *map(len, rows)]))                # row names right-aligned in it
    lines = [title, pad + "".join(f"{c:>3s}" for c in cols)]
    for r, row in zip(rows, mat):
        cells = "".join(f"  {shades[min(9, int((v - lo) / (hi - lo + 1e-12) * 9.999))]}"
                        for v in row)
        lines.append(f"{r:>{len(pad) - 1}s} {cells}   " + " ".join(f"{v:.3f}" for v in row))
    return "\n".join(lines + [f"{pad}(shade: {lo:.3f} -> {hi:.3f})"])


def heatmap_grid(plt, panels, path, label=None, ncols=4, size=(4.2, 3.8), values=None, title=None):
    """Heat maps on one colour scale (0 to the largest cell), rows of up to ncols panels of `size`
    inches, one colour bar (label), as a PNG -> path. panels: [(matrix, row labels, column labels,
    {ax.set's keywords: title, xlabel, ...})]; values: a format spec to print each cell in it."""
    n = min(len(panels), ncols)
    rows = -(-len(panels) // n)
    fig, axes = plt.subplots(rows, n, figsize=(size[0] * n, size[1] * rows), squeeze=False,
                             layout="constrained")
    top = max(float(np.max(m)) for m, *_ in panels)
    for ax, (m, row_names, col_names, kw) in zip(axes.flat, panels):
        m = np.asarray(m)
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=top)
        ax.set(xticks=range(m.shape[1]), xticklabels=col_names, yticks=range(m.shape[0]),
               yticklabels=row_names, **kw)
        ax.tick_params(labelsize=7)
        ax.title.set_fontsize(8)
        for (i, j), v in np.ndenumerate(m) if values else ():
            ax.text(j, i, format(v, values), ha="center", va="center", fontsize=7,
                    color="w" if v < top / 2 else "k")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label=label)
    if title:
        fig.suptitle(title)
    return save_png(plt, fig, path)


# --------------------------------------------------------------------------------------------------
# Runs: checkpoints that carry their config, finished runs reused, worker processes
# --------------------------------------------------------------------------------------------------

def config_key(cfg, free=()):
    """The settings that decide a run's numbers: every field of the dataclass cfg except those in
    `free` (threads, output folder, ...), as one JSON string (keys sorted)."""
    return json.dumps({k: v for k, v in asdict(cfg).items() if k not in free}, sort_keys=True)


def save_checkpoint(path, model, cfg, **state):
    """model's weights (without torch.compile's `_orig_mod.` prefix), cfg as a dict and **state
    (optimizer, step, ...), atomically: a crash mid-write leaves the previous checkpoint."""
    weights = {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}
    torch.save(dict(model=weights, config=asdict(cfg), **state), path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, cfg, free=(), device="cpu"):
    """The checkpoint save_checkpoint wrote at path (None when there is none); a BadInput when it
    was made with other settings than cfg (fields in `free` aside; fields added since then count as
    their defaults)."""
    if not os.path.exists(path):
        return None
    ck = torch.load(path, map_location=device, weights_only=True)
    old = {**asdict(type(cfg)()), **ck["config"]}
    diff = [k for k in asdict(cfg) if k not in free and old[k] != getattr(cfg, k)]
    if diff:
        raise BadInput(f"--resume: checkpoint {path} was made with different settings: "
                       f"{', '.join(diff)}")
    return ck


def restore(path, cfg, free, device, model, opt):
    """Continue from the checkpoint at path (load_checkpoint): its weights into model, its
    optimizer state (key "opt") into opt, its "rng" into torch's CPU generator -> the rest of the
    state it was saved with (step, ...), or None when there is no checkpoint."""
    ck = load_checkpoint(path, cfg, free, device)
    if ck is None:
        return None
    model.load_state_dict(ck.pop("model"))
    opt.load_state_dict(ck.pop("opt"))
    torch.set_rng_state(ck.pop("rng").cpu())
    return {k: v for k, v in ck.items() if k != "config"}


def finished_result(path, key):
    """The result a run wrote at path, if it was made with the settings `key` (config_key); else
    None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        res = json.load(f)
    return res if res.get("config_key") == key else None


def worker_threads(threads, jobs):
    """Torch threads of each of `jobs` worker processes: `threads` as given; for 0 (torch's default:
    one thread per core in EVERY process) the cores shared out, so that the workers do not
    oversubscribe them."""
    return threads or max(1, (os.cpu_count() or 1) // jobs)


def pool_map(fn, tasks, jobs):
    """fn(*task) for each task in `jobs` worker processes -> the results in task order, as they
    come. The workers start with 'spawn' (fresh interpreters): fn is a module-level function, the
    tasks are pickled (so no worker rebuilds the data it is given)."""
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for fut in [pool.submit(fn, *task) for task in tasks]:
            yield fut.result()


def run_each(fn, tasks, jobs=1, threads=0):
    """fn(*task) for each task -> the results in task order, as they come: in this process, or with
    jobs > 1 (and more than one task) in `jobs` worker processes (pool_map) of
    worker_threads(threads, jobs) torch threads each, where fn(*task, quiet=True): the workers'
    progress lines would interleave."""
    if jobs < 2 or len(tasks) < 2:
        return (fn(*task) for task in tasks)
    return pool_map(_quiet, [(fn, worker_threads(threads, jobs), task) for task in tasks], jobs)


def _quiet(fn, threads, task):
    set_threads(threads)
    return fn(*task, quiet=True)


# --------------------------------------------------------------------------------------------------
# Timing: the median of interleaved rounds
# --------------------------------------------------------------------------------------------------

def interleaved_ms(fns, device, rounds=15, warmup=1):
    """Wall time (ms) of each fn(round) in {name: fn}: `warmup` untimed calls each, then `rounds`
    round-robin rounds, so that a busy spell of the machine hits every fn alike -> {name: median
    ms}. The one timing statistic of the repository (the median: robust to a few disturbed rounds,
    unlike the mean, and not biased to the luckiest round, as the minimum is)."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for r in range(warmup):
        for f in fns.values():
            f(r)
    ts = {k: [] for k in fns}
    for r in range(rounds):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f(warmup + r)
            sync()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


# --------------------------------------------------------------------------------------------------
# torchrun: data parallelism over processes (gloo on CPU, NCCL on GPUs)
# --------------------------------------------------------------------------------------------------

def rank_world():
    """(rank, world size); before init_process_group, what torchrun put in the environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def all_ranks_sum(t):
    """Sum of a no-grad tensor over the data-parallel ranks (the tensor itself in one process). The
    ONE place ranks exchange numbers besides DDP's gradient averaging."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def say(msg, quiet=False):
    """Print from rank 0 (which speaks, and writes files, for all), above any progress bar."""
    if rank_world()[0] == 0 and not quiet:
        tqdm.write(msg)


def setup_distributed(device, world):
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    gloo on CPU, NCCL on CUDA with one GPU per process. Returns this rank's device."""
    if world == 1:
        return device
    missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        raise BadInput(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun")
    device = torch.device(device)
    backend = {"cpu": "gloo", "cuda": "nccl"}.get(device.type)
    if backend is None:
        raise BadInput(f"data parallelism runs on cpu (gloo) or cuda (nccl), not on {device}")
    if not (dist.is_available() and getattr(dist, f"is_{backend}_available")()):
        raise BadInput(f"torch.distributed backend {backend} is not available in this torch build")
    if device.type == "cuda":
        local, n_gpu = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= n_gpu:
            raise BadInput(f"LOCAL_RANK {local} but {n_gpu} GPU(s): at most one process per GPU")
        device = torch.device(f"cuda:{local}")
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    return device


def meet_before_exit(world):
    """A check failed alike on every rank before the process group existed. Under torchrun, the
    first rank to exit gets the others stopped (SIGTERM): rank 1 could leave before rank 0 had even
    printed the error. So the ranks join a gloo group only to leave together, after rank 0 has
    printed; with a timeout, so a rank that never comes (it saw no error) cannot hold the others."""
    if world == 1 or not all(v in os.environ for v in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        return
    if not (dist.is_available() and dist.is_gloo_available()):
        return
    try:
        wait = datetime.timedelta(seconds=30)
        dist.init_process_group("gloo", timeout=wait)
        dist.monitored_barrier(timeout=wait)
    except Exception:                                      # no group or no partner: exit as before
        pass


def shutdown_distributed(clean):
    """Leave the process group together. Ranks > 0 finish first (rank 0 alone evaluates, checkpoints
    and writes); one that destroyed the group and exited while rank 0 still used it made torch
    2.11's gloo abort a rank. So on a clean exit every rank meets at a barrier first. After an error
    that only some ranks saw, no barrier (the others may never arrive): destroy and exit, and
    torchrun stops the remaining ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def main_distributed(prog, argv, parse, prepare, run_fn, errors=(BadInput,)):
    """main() under torchrun: parse(argv) -> cfg (argparse's one-line errors from rank 0 only);
    prepare(cfg, world) -> (device, data): every check that can fail, before any process group
    exists (all ranks see the same flags and WORLD_SIZE, so they fail alike and leave together);
    then the group; run_fn(cfg, data, device). An error in `errors`: one line from rank 0, exit
    status 2."""
    clean = grouped = False                        # clean: every rank is known to exit the same way
    world = int(os.environ.get("WORLD_SIZE", "1"))         # set by torchrun
    try:
        try:
            with redirect_stderr(io.StringIO()) if rank_world()[0] else nullcontext():
                cfg = parse(argv)
        except SystemExit as e:
            if e.code:
                meet_before_exit(world)
            raise
        device, data = prepare(cfg, world)
        grouped = True
        # after every check that can fail alike on all ranks
        device = setup_distributed(device, world)
        out = run_fn(cfg, data, device)
        clean = True
        return out
    except errors as e:                                    # raised alike on every rank
        if rank_world()[0] == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        if grouped:
            clean = True                                   # the ranks meet at shutdown's barrier
        else:
            meet_before_exit(world)
        sys.exit(2)
    finally:                                         # also on Ctrl-C: leave no process group behind
        shutdown_distributed(clean)


def exit_process(main_fn, argv=None):
    """Run main_fn(argv) and exit; a torchrun rank leaves with os._exit, skipping the interpreter's
    teardown. Even after the barrier and destroy_process_group above, a rank sometimes died at exit
    with SIGABRT ("terminate called without an active exception": a C++ thread object destroyed
    while still running) on torch 2.13 and 2.11. What is left at that point is only that teardown
    (results and checkpoints are written and closed), so a rank skips it. One process (WORLD_SIZE
    unset or 1) exits the normal way."""
    try:
        main_fn(argv)
        code = 0
    except SystemExit as e:                                # the one-line errors: exit 2
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# --------------------------------------------------------------------------------------------------
# Runs of a grid: runs keyed by the protocol that made them in one results.json, kept across
# reruns; --report; tables and curves over seeds; flag values checked against choices and intervals
# --------------------------------------------------------------------------------------------------

def grid_protocol(cfg, groups, **extra):
    """The settings that change a run's numbers: the fields of the dataclass cfg in the flag groups
    `groups`, plus `extra` -> (that dict, its protocol_key). Runs that differ only in other flags
    (output, threads) are the same run."""
    protocol = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata["group"] in groups}
    protocol.update(extra)
    return protocol, protocol_key(protocol)


def run_grid(path, res, protocol, grid, names, run_one, label):
    """Run each point of `grid` (tuples of the record fields `names`) that results.json `res` (from
    load_results(path)) does not hold under this protocol: run_one(tag, *point) -> its record. A
    finished one is kept, not redone; path is rewritten after every run, so an interrupted grid
    keeps what it finished. -> (res, this grid's runs in results.json's order)."""
    key, ident = protocol_key(protocol), lambda r: tuple(r.get(n) for n in names)
    res["protocols"] = {**res.get("protocols", {}), key: protocol}
    done = {ident(r) for r in res["runs"] if r.get("protocol") == key}
    for i, point in enumerate(grid):
        tag = f"[{i + 1}/{len(grid)}] "
        if point in done:
            print(f"{tag}{label(*point)}: finished earlier with protocol {key}, kept")
            continue
        res["runs"].append({**run_one(tag, *point), "protocol": key})
        write_json(path, res)
    mine = [r for r in res["runs"] if r.get("protocol") == key and ident(r) in set(grid)]
    return res, mine


def open_results(out, *subdirs):
    """--out (and its `subdirs`, e.g. "ckpt") made writable and its results.json read, a bad one
    refused before any work -> (the path, the results, the start time)."""
    writable_dirs(out=out)
    for d in subdirs:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    path = os.path.join(out, "results.json")
    return path, load_results(path), time.time()


def report_results(path, tables):
    """--report PATH: tables(runs) for each protocol a results.json holds, under its settings; no
    training. -> the results."""
    if not os.path.isfile(path):
        raise BadInput(f"--report {path}: no such file")
    res = load_results(path)
    for key, protocol, runs in by_protocol(res):
        print(f"protocol {key}: {json.dumps(protocol, sort_keys=True)}\n")
        print(tables(runs) + "\n")
    return res


def group_table(runs, keys, cols, order=None):
    """The lines of a text table: a header, then a row per group of runs that share the fields
    `keys` (first seen first, or sorted by order(the group's values of keys)); cols: [(title, format
    spec such as '>8', cell(the group's runs) -> str)], one space apart."""
    groups = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    items = sorted(groups.items(), key=lambda kv: order(kv[0])) if order else groups.items()
    line = lambda cells: " ".join(f"{c:{spec}}" for c, (_, spec, _) in zip(cells, cols))
    return [line(t for t, _, _ in cols)] + [line(cell(rs) for *_, cell in cols) for _, rs in items]


def text_table(title, runs, keys, cols, order=None, rule=False):
    """group_table as one text: the title line(s) above it, a rule of dashes under its header with
    rule=True."""
    head, *rows = group_table(runs, keys, cols, order)
    return "\n".join([title, head] + ["-" * len(head)] * rule + rows)


def series_of(runs, curve, x, y, names):
    """curve_png's series from run records: a curve per value of the field `curve` in `names` that
    the runs have (in that order), its points (r[x], r[y])."""
    return {n: [(r[x], r[y]) for r in runs if r[curve] == n] for n in names
            if any(r[curve] == n for r in runs)}


def curve_png(plt, path, series, **axes):
    """A line plot (plt: what pyplot() returned): a curve per series {label: [(x, y), ...]}, y
    averaged over the points that share an x (seeds); ax.set(**axes) -> save_png's path."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in series.items():
        xs = sorted({x for x, _ in points})
        ax.plot(xs, [np.mean([y for x2, y in points if x2 == x]) for x in xs], "o-", label=label)
    ax.set(**axes)
    ax.legend()
    fig.tight_layout()
    return save_png(plt, fig, path)


def parse_choices(text, choices, name):
    """--name's comma list, each item one of `choices`; the first that is not is a BadInput."""
    values = parse_list(text, str, name)
    if bad := [v for v in values if v not in choices]:
        raise BadInput(f"--{name}: unknown {name.rstrip('s')} {bad[0]!r} (choose from "
                       f"{', '.join(choices)})")
    return values


def check_ranges(values, **intervals):
    """Each named value (a number, or a list: each of them) inside its interval, written as in
    maths: q="(0, 1]", momentum="[0, 1)", decay_every="[-1, inf)"; the first that is not (a NaN
    never is) is a BadInput naming its flag. values: a dict, e.g. {**vars(cfg), "seeds": seeds}."""
    for name, iv in intervals.items():
        lo, hi = (float(s) for s in iv[1:-1].split(","))
        for v in values[name] if isinstance(values[name], list) else [values[name]]:
            inside = lo <= v if iv[0] == "[" else lo < v
            if not (inside and (v <= hi if iv[-1] == "]" else v < hi)):
                raise BadInput(f"--{name.replace('_', '-')} must be in {iv}, got {v}")

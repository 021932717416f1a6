"""How a routing run is measured and shown: the routing metrics on domain x expert count matrices,
the domain probes on the router's input, and the reports (table, heat maps, PNGs). A paper file
hands in what only it knows: the reference router's home groups, its Config (the report's header).

    acc = add_record(acc, layer_stats, dom_T, L, E)      # per forward, per MoE layer
    m = routing_metrics(acc[layer], home_LG)              # U, MaxVio, purity, NMI, agreement, ...

Shape legend: L = domains, E = experts, G = experts in a reference group (home_LG), T = tokens.
"""

import math
import os

import numpy as np
import torch

from data.run import (heatmap, heatmap_grid, hungarian, linear_probe, mean_sd, pyplot, rank_world,
                      save_png, say, table)


# ---------------- Routing metrics (numpy, on domain x expert count matrices)

def utilization(f_E):
    """U = sum_i min(f_i, 1/E): 1 = perfectly balanced, 1/E = collapse onto one expert."""
    return float(np.minimum(f_E, 1.0 / len(f_E)).sum())


def max_violation(f_E):
    """MaxVio (Wang et al. 2408.15664) = (max_i load_i - mean load) / mean load = E * max_i f_i - 1.
    """
    return float(len(f_E) * f_E.max() - 1.0)


def dead_experts(f_E):
    return int((f_E < 0.1 / len(f_E)).sum())


def purity(top1_LE):
    """Fraction of tokens whose top-1 expert's majority domain is their own: sum_e max_d M[d,e] / N.
    """
    return float(top1_LE.max(0).sum() / top1_LE.sum())


def nmi(top1_LE):
    """NMI(domain; top-1 expert) = I(D;E) / sqrt(H(D) H(E)); 0 when either is constant."""
    p = top1_LE / top1_LE.sum()
    pd, pe = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pd, pe)[nz])).sum())
    hd, he = [float(-(q[q > 0] * np.log(q[q > 0])).sum()) for q in (pd, pe)]
    return 0.0 if hd <= 0 or he <= 0 else mi / math.sqrt(hd * he)


def agreement(top1_LE, home_LG):
    """Reference agreement: fraction of tokens whose top-1 expert lies in their domain's home group,
    after the best one-to-one relabelling of learned experts onto reference experts (a learned
    router's numbering is arbitrary). Top-1, not every slot: the reference also uses K slots
    (moe_testbed.route_reference), so any top-k router can reach 1.0. gain[e, r] = tokens of
    expert e in-group if e were reference expert r; the relabelling maximising
    sum_e gain[e, perm[e]] is found exactly by the Hungarian algorithm. -> (agreement, perm)"""
    L, E = top1_LE.shape
    in_group_LR = np.zeros((L, E))
    for d in range(L):
        in_group_LR[d, home_LG[d]] = 1.0
    gain_ER = top1_LE.T @ in_group_LR
    perm = hungarian(-gain_ER)
    return float(gain_ER[np.arange(E), perm].sum() / top1_LE.sum()), perm


def routing_metrics(a, home_LG):
    """Metrics of one layer's record `a` (see add_record)."""
    f_E = a["assign"].sum(0) / a["assign"].sum()
    agr, perm = agreement(a["top1"], home_LG)
    share_LE = a["assign"] / np.maximum(a["assign"].sum(1, keepdims=True), 1e-12)
    return dict(utilization=utilization(f_E), maxvio=max_violation(f_E),
                dead_experts=dead_experts(f_E), purity=purity(a["top1"]), agreement=agr,
                nmi=nmi(a["top1"]), dropped_frac=a["drop"] / max(a["slots"], 1),
                entropy=None if a["ent"] is None else float(a["ent"] / a["top1"].sum()),
                routing_matrix=share_LE.round(4).tolist(),
                expert_order=np.argsort(perm).tolist())


def add_record(acc, layer_stats, dom_T, L, E):
    """Add one forward's routing record into per-layer domain x expert matrices (the host syncs).
    layer_stats: a dict per MoE layer (layer, assign_TE, top1_T, n_drop, n_slots, ent_sum);
    dom_T: each token's domain."""
    for st in layer_stats:
        a = acc.setdefault(st["layer"], dict(assign=np.zeros((L, E)), top1=np.zeros((L, E)), drop=0,
                                             slots=0, ent=None if st["ent_sum"] is None else 0.0))
        a["assign"] += torch.zeros(L, E).index_add_(0, dom_T, st["assign_TE"].float().cpu()).numpy()
        a["top1"] += torch.zeros(L, E).index_put_((dom_T, st["top1_T"].cpu()),
                                                  torch.ones(len(dom_T)), accumulate=True).numpy()
        a["drop"] += int(st["n_drop"])
        a["slots"] += st["n_slots"]
        if a["ent"] is not None:
            a["ent"] += float(st["ent_sum"])
    return acc


HISTORY_KEYS = ("purity", "nmi", "utilization", "maxvio", "entropy", "dropped_frac")


def step_history(acc, home_LG, step, bpb):
    """A training step's routing history: per MoE layer, the HISTORY_KEYS metrics of the step's
    batch (rounded), beside the step and its train bpb."""
    recs = []
    for layer, a in acc.items():
        m = routing_metrics(a, home_LG)
        recs.append(dict(step=step, layer=layer, train_bpb=round(bpb, 4),
                         **{k: None if m[k] is None else round(m[k], 4) for k in HISTORY_KEYS}))
    return recs


# ---------------- Averaged over MoE layers, with the domain probes

METRIC_KEYS = ("utilization", "maxvio", "dead_experts", "purity", "agreement", "nmi", "entropy",
               "dropped_frac", "domain_probe")


def routing_summary(acc, feats, wins, vdom, bpb_S, home_LG):
    """Per MoE layer: routing metrics and the domain probes; their means over layers; the routing
    matrix of all layers; N (probe_n) and the val bpb after the first N bytes of a window (bpb_S:
    the val bpb at each of the window's S positions)."""
    if not acc:
        return dict({k: None for k in METRIC_KEYS}, routing_matrix=None, per_layer=[], probe_n=None,
                    val_bpb_after_n=None)
    S = len(bpb_S)
    per_layer = [dict(layer=layer, **routing_metrics(a, home_LG),
                      domain_probe=domain_probe(feats[layer], wins, vdom),
                      probe_by_position=probe_by_position(feats[layer], wins, vdom, S))
                 for layer, a in acc.items()]
    out = {}
    for k in METRIC_KEYS:
        vals = [r[k] for r in per_layer if r[k] is not None]
        out[k] = float(np.mean(vals)) if vals else None
    total = sum(a["assign"] for a in acc.values())
    n = probe_n([lay["probe_by_position"] for lay in per_layer])
    return dict(out, routing_matrix=(total / total.sum(1, keepdims=True)).round(4).tolist(),
                per_layer=per_layer, probe_n=n,
                val_bpb_after_n=None if n is None else float(bpb_S[n:].mean()))


def probe_inputs(modules):
    """Record each module's input (the router's input of an MoE layer), every 4th byte, while it
    runs -> ({layer_id: [rows, one tensor per forward]}, the hooks to remove)."""
    feats = {}
    hooks = [m.register_forward_hook(lambda m, i, o: feats.setdefault(m.layer_id, []).append(
        i[0][:, ::4].float().reshape(-1, i[0].shape[-1]).cpu())) for m in modules]
    return feats, hooks


def probe_rows(feats, wins, vdom):
    """The probe's rows: router inputs x, the domain of each row, and whether the row's window is an
    even one of its domain (the probe is fitted on the even windows and scored on the odd ones)."""
    x = torch.cat(feats)
    w = np.repeat(np.concatenate(wins), len(x) // sum(map(len, wins)))      # window of each row
    k = np.zeros(len(vdom), dtype=int)                                     # window's rank in domain
    for d in np.unique(vdom):
        k[vdom == d] = np.arange((vdom == d).sum())
    return x, torch.from_numpy(vdom[w]).long(), torch.from_numpy(k[w] % 2 == 0)


def domain_probe(feats, wins, vdom):
    """How well the domain can be read linearly from the router's input: a ridge probe fitted on
    half of each domain's held-out windows, scored on the other half (every 4th byte). Near 1: the
    information a router would need to route by domain is there, and a purity below it is the
    routing's own doing. None with one window per domain (--eval-seqs 1): nothing to score on."""
    x, dom, even = probe_rows(feats, wins, vdom)
    return None if even.all() else linear_probe(x[even], dom[even], x[~even], dom[~even])


def probe_by_position(feats, wins, vdom, S, stride=4):
    """The domain probe scored at each sampled position of the window: [(position, accuracy)], the
    probe fitted on every position of the even windows (as domain_probe), scored on the odd windows'
    rows at that position. How far into a window the router's input tells the domain."""
    x, dom, even = probe_rows(feats, wins, vdom)
    if even.all():
        return None
    pos = np.tile(np.arange(0, S, stride), len(x) // len(range(0, S, stride)))   # row positions
    out = []
    for p in range(0, S, stride):
        te = ~even & torch.from_numpy(pos == p)
        out.append((p, round(linear_probe(x[even], dom[even], x[te], dom[te]), 4)))
    return out


def probe_n(curves, level=0.9):
    """N: the first sampled position from which the probe scores >= level at every later sampled
    position, in every MoE layer; the bytes before N are where a router cannot yet know the domain.
    None when a layer never gets there (or has no curve)."""
    ns = []
    for curve in curves:
        if not curve:
            return None
        later_ok = [all(a >= level for _, a in curve[i:]) for i in range(len(curve))]
        if not any(later_ok):
            return None
        ns.append(curve[later_ok.index(True)][0])
    return max(ns) if ns else None


# ---------------- Reports: a table row and heat maps per run, the summary, PNGs

COLS = [("val_bpb", "val bpb", ".3f"), ("val_bpb_after_n", "bpb after N", ".3f"),
        ("probe_n", "N", ".0f"), ("utilization", "U", ".3f"), ("maxvio", "MaxVio", ".2f"),
        ("purity", "purity", ".3f"), ("agreement", "agree", ".3f"), ("nmi", "NMI", ".3f"),
        ("entropy", "entropy", ".3f"), ("dropped_frac", "dropped", ".3f"),
        ("tokens_per_s", "tok/s", ".0f")]


def report_run(res, domains):
    """One run as it finishes: a heat map per MoE layer (experts in the reference's order: a
    diagonal if matched) and its row of the table. Ranks > 0 hand in {}: nothing to show."""
    for lay in res.get("per_layer", []):
        order = lay["expert_order"]
        say(heatmap(np.asarray(lay["routing_matrix"])[:, order], domains,
                    [str(e) for e in order], f"[{res['name']} seed {res['seed']}] layer "
                    f"{lay['layer']}: share of routing slots, domain \\ expert"))
    if res:
        say(table([res], COLS, header=False) + f"  ({res['train_s']:.0f} s)")


def report(cfg, runs, device, wall_s):
    """The summary of a run or sweep (cfg: its Config): a header, the table, the single run's
    per-domain bpb and domain probe, the PNGs."""
    world, r = rank_world()[1], runs[0]
    say(f"\n{len(runs)} run(s), {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} bytes, wall "
        f"{wall_s:.0f} s on {device}" + (f" x {world} processes" if world > 1 else "")
        + (f", {cfg.jobs} worker processes" if cfg.jobs > 1 else ""))
    say(table(runs, COLS))
    if len(runs) == 1 and r["per_domain_bpb"]:
        say("val bpb per domain: "
            + ", ".join(f"{k} {v:.3f}" for k, v in r["per_domain_bpb"].items()))
        if r["domain_probe"] is not None:
            say(f"domain read linearly from the router's input (ridge probe, held-out windows): "
                f"{r['domain_probe']:.3f}, against purity {r['purity']:.3f}")
        if r["probe_n"] is not None:
            say(f"the probe scores >= 0.9 from byte N = {r['probe_n']} on: val bpb after the "
                f"first N bytes {r['val_bpb_after_n']:.3f} (all bytes {r['val_bpb']:.3f})")
    for path in plots(runs, cfg.out):
        say(f"wrote {path}")


def plots(runs, out_dir):
    """PNGs with matplotlib: routing over training; (balance sweep) purity vs the tokens a balancing
    group spans; routing heat maps (first seed of each run, as in the terminal). -> their paths"""
    if (plt := pyplot()) is None:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("purity", "utilization", "maxvio")):
        for r in runs:
            for layer in sorted({h["layer"] for h in r["history"]}):
                hs = [h for h in r["history"] if h["layer"] == layer]
                ax.plot([h["step"] for h in hs], [h[key] for h in hs],
                        label=f"{r['name']} s{r['seed']} L{layer}")
        ax.set(xlabel="step", title=f"train-batch {key}")
    axes[0].legend(fontsize=6)
    paths = [save_png(plt, fig, os.path.join(out_dir, "history.png"))]
    sizes = sorted({r["balance_tokens"] for r in runs if r["router"] == "topk"
                    and r["balance"] != "none"})
    if len(sizes) > 2:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("purity", "nmi", "utilization"):
            stats = [mean_sd([r[key] for r in runs if r["balance_tokens"] == n]) for n in sizes]
            ax.errorbar(sizes, [m for m, _ in stats], yerr=[s or 0 for _, s in stats], label=key,
                        capsize=3)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="tokens per balancing group")
        ax.legend()
        paths.append(save_png(plt, fig, os.path.join(out_dir, "balance.png")))
    panels = [(np.asarray(lay["routing_matrix"])[:, lay["expert_order"]], list(r["per_domain_bpb"]),
               lay["expert_order"], dict(xlabel="expert (in the reference's order)",
               title=f"{r['name']} s{r['seed']} L{lay['layer']}: purity {lay['purity']:.2f}, "
                     f"U {lay['utilization']:.2f}"))
              for r in runs if r["seed"] == runs[0]["seed"] for lay in r.get("per_layer") or []]
    if panels:
        paths.append(heatmap_grid(plt, panels, os.path.join(out_dir, "routing.png"),
                                  label="share of the domain's routing slots"))
    return paths

"""What an MoE training step costs: its FLOPs per token (behind the model TFLOP/s and MFU a log
line shows), the route its expert dispatch takes on a device, and its time against a dense step
with the same active parameters.

    flops = train_flops_per_token(cfg, prepass)      # 6 x active params + attention, per token
    out = bench(make, prepass, device)               # MoE vs dense step time: the ratio
    report_bench(out)                                # its line(s), as --bench prints them

cfg is a model's Config (moe_testbed.py): its d_model, n_layer, seq_len, top_k, expert_hidden,
batch_size, impl and dtype are read.
"""

import torch

from data.run import interleaved_ms, say
from kernels import dispatch_route


def train_flops_per_token(cfg, prepass):
    """6 x active parameters per token (the dense FFN width K*H = the MoE's active experts) + causal
    attention (6 * 2 * S * D per layer, halved for causality); embeddings and router not counted.
    When the step runs the routing pre-pass (prepass: moe_testbed.prepass_runs), that is one more
    forward, 2 of the 6: x 4/3."""
    D, S = cfg.d_model, cfg.seq_len
    per_layer = 4 * D * D + 2 * D * cfg.top_k * cfg.expert_hidden
    fwd_bwd = 6 * (cfg.n_layer * per_layer + 256 * D) + cfg.n_layer * 6 * S * D
    return fwd_bwd * 4 / 3 if prepass else fwd_bwd


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # bf16 dense, vendor sheets


def flops_note(cfg, device, tok_s, prepass):
    """On CUDA: model TFLOP/s (train_flops_per_token x tokens/s, the routing pre-pass included
    when it runs) and MFU against the GPU's nominal bf16 peak."""
    if torch.device(device).type != "cuda":
        return ""
    tflops = train_flops_per_token(cfg, prepass) * tok_s / 1e12
    name = torch.cuda.get_device_name(torch.device(device))
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return (f" | {tflops:.1f} model TFLOP/s" + (" (pre-pass incl.)" if prepass else "")
            + (f", MFU {tflops / peak:.1%} of {peak:.0f}" if peak else ""))


def run_dispatch(cfg, device):
    """How the MoE layers' experts run on this device: impl, the grouped GEMM's route
    (kernels.grouped_route: "native" = torch._grouped_mm, no host syncs; "loop" = a per-group loop,
    6 host syncs per MoE layer per forward + backward) and a note. Printed once, kept in
    results.json."""
    if cfg.impl == "loop":
        return dict(impl="loop", route="loop", note=" (--impl loop: a matmul pair per expert)")
    route = dispatch_route(device, torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
                           cfg.d_model, cfg.expert_hidden)
    note = ""
    if route == "loop" and device.type == "cuda":
        note = (" (a per-group loop: 6 host syncs per MoE layer per step; torch._grouped_mm runs "
                "on sm90 with --dtype bfloat16 and --d-model, --expert-hidden multiples of 8)")
    return dict(impl=cfg.impl, route=route, note=note)


def bench(make, prepass, device, n=20, warm=3):
    """Step time of the MoE model and of the dense one (same active parameters): the median of n
    interleaved rounds (data.run.interleaved_ms). make(kind) -> (cfg, model, step) with step(i)
    running optimizer step i, for kind "moe", "dense" and, when the MoE step runs the routing
    pre-pass (prepass), "moe_no_prepass": the same step less the no-grad forwards."""
    kinds = ("moe", "dense") + (("moe_no_prepass",) if prepass else ())
    models = {kind: make(kind) for kind in kinds}
    fns = {kind: step for kind, (_, _, step) in models.items()}
    sec = {k: ms / 1e3 for k, ms in interleaved_ms(fns, device, rounds=n, warmup=warm).items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, (_, m, _) in models.items()}
    cfg = models["moe"][0]
    tokens, no_pre = cfg.batch_size * cfg.seq_len, sec.get("moe_no_prepass")
    return dict(moe_step_s=sec["moe"], dense_step_s=sec["dense"], ratio=sec["moe"] / sec["dense"],
                prepass=prepass, moe_no_prepass_step_s=no_pre,
                ratio_no_prepass=None if no_pre is None else no_pre / sec["dense"],
                moe_params=params["moe"], dense_params=params["dense"], steps_timed=n,
                moe_tokens_per_s=tokens / sec["moe"],
                moe_model_tflops=train_flops_per_token(cfg, prepass) * tokens / sec["moe"] / 1e12)


def report_bench(b):
    """Print bench's result: MoE vs dense step time, and the MoE step without the pre-pass."""
    say(f"MoE step {b['moe_step_s'] * 1e3:.1f} ms vs dense (same active params) "
        f"{b['dense_step_s'] * 1e3:.1f} ms -> ratio {b['ratio']:.2f} (median of "
        f"{b['steps_timed']} interleaved steps; params total "
        f"{b['moe_params']:,} vs {b['dense_params']:,}) | MoE {b['moe_tokens_per_s']:,.0f} tok/s, "
        f"{b['moe_model_tflops']:.3f} model TFLOP/s (6 x active params + attention"
        + (", routing pre-pass included)" if b["prepass"] else ")"))
    if b["prepass"]:
        say(f"without the routing pre-pass (--balance-scope running): MoE step "
            f"{b['moe_no_prepass_step_s'] * 1e3:.1f} ms -> ratio {b['ratio_no_prepass']:.2f}")

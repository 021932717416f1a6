"""Top-k Mixture-of-Experts FFN dispatch: one public function, three implementations.

    y_TD, dropped_TK = moe_ffn(x_TD, expert_idx_TK, gates_TK, w_in_EDH, w_out_EHD, impl="grouped")

Shape legend (gpt-fast / torchtitan style):
    T = tokens, D = model dim, H = expert hidden dim, E = experts, K = top-k slots per token,
    A = T*K assignments, C = capacity (slots per expert).

Each expert is a GELU MLP (exact erf GELU, no biases):   E_e(x) = gelu(x @ w_in[e]) @ w_out[e]
and the layer computes, for every token t,               y_t = sum_k gates[t,k] * E_{idx[t,k]}(x_t)
The gates are used as given (the router decides whether to renormalise them over the top-k).

Implementations (`impl=`):
    "loop"      one small matmul pair per expert: torch.where + gather + index_add_. Easy to read,
                the reference for speed. Data-dependent shapes, so it does not compile into one graph.
    "grouped"   sort the A = T*K assignments by expert, gather the rows, run ONE grouped GEMM over
                int32 offsets (the offsets are values, not shapes), scale by the gate, scatter back.
                Every shape depends only on (T, K, D, H, E), so torch.compile(fullgraph=True) builds one
                graph that is reused for any routing pattern (no recompiles).
    "capacity"  a fixed [E, C, D] buffer per expert, C = ceil(capacity_factor * T*K / E), two bmm's.
                Assignments past C are DROPPED (the token keeps only its residual path for that slot).
                Priority is token order: assignment (t, k) is the (t*K + k)-th in line for its expert.
                Also compiles as one graph.
Only "capacity" ever drops; for the others `dropped_TK` is all False.

Compilation is lazy and optional: `compile=True` compiles the chosen impl on its first call (one graph,
`fullgraph=True`); `compile=False` always runs eagerly.

The grouped GEMM is wrapped in a small custom op (`moe_kernels::grouped_mm`) because torch's own
`_grouped_mm` has gaps we must paper over on both torch versions this repo supports: on CPU it wants
16-byte-aligned rows and no float64, and its compile-time (meta) check accepts bf16 only, while the
GPU image runs an older torch. Inside the op we call `torch._grouped_mm` when it takes the inputs and
fall back to a per-group loop otherwise; to torch.compile the op is an opaque call with a known output
shape, so the graph stays whole either way.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["moe_ffn", "IMPLS", "grouped_mm"]

IMPLS = ("loop", "grouped", "capacity")


# ----------------------------------------------------------------------------------------------------
# The grouped GEMM: out[rows of group g] = a[rows of group g] @ b[g], groups delimited by int32 ends.
# ----------------------------------------------------------------------------------------------------

def _native_grouped_mm_ok(*mats):
    """Would torch._grouped_mm accept these operands? Checked from dtype, device and strides, not tried."""
    a = mats[0]
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.dtype not in (torch.bfloat16, torch.float16, torch.float32) or any(m.dtype != a.dtype for m in mats):
        return False
    if a.device.type == "cuda":
        # the CUDA kernels (Hopper and newer) take bf16 on every torch version we support
        if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device) < (9, 0):
            return False
    elif a.device.type != "cpu":
        return False
    # every stride but the unit one must be a multiple of 16 bytes (row- or column-major operands)
    return all(m.stride(-1) == 1 or m.stride(-2) == 1 for m in mats) and all(
        (st * m.element_size()) % 16 == 0 for m in mats for st in m.stride()[-2:] if st != 1)


def _grouped_mm_eager(a_AD, b_EDH, offs_E):
    """Slow-but-always-correct path: one matmul per group. offs_E[g] = end row of group g."""
    out_AH = a_AD.new_zeros(a_AD.shape[0], b_EDH.shape[-1])
    start = 0
    for g, end in enumerate(offs_E.tolist()):
        if end > start:
            out_AH[start:end] = a_AD[start:end] @ b_EDH[g]
        start = end
    return out_AH


def _grouped_wgrad_eager(a_AD, g_AH, offs_E, num_groups):
    """dW[g] = a[rows of g]^T @ g[rows of g]  ->  (E, D, H)."""
    out_EDH = a_AD.new_zeros(num_groups, a_AD.shape[1], g_AH.shape[1])
    start = 0
    for g, end in enumerate(offs_E.tolist()):
        if end > start:
            out_EDH[g] = a_AD[start:end].T @ g_AH[start:end]
        start = end
    return out_EDH


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def grouped_mm(a_AD: torch.Tensor, b_EDH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """(A, D) x (E, D, H) -> (A, H): rows offs_E[g-1]:offs_E[g] of `a` multiply b[g]."""
    if _native_grouped_mm_ok(a_AD, b_EDH):
        return torch._grouped_mm(a_AD, b_EDH, offs=offs_E)   # b may be a transposed view
    return _grouped_mm_eager(a_AD, b_EDH, offs_E)


@grouped_mm.register_fake
def _(a_AD, b_EDH, offs_E):
    return a_AD.new_empty(a_AD.shape[0], b_EDH.shape[-1])


@torch.library.custom_op("moe_kernels::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(a_AD: torch.Tensor, g_AH: torch.Tensor, offs_E: torch.Tensor,
                      num_groups: int) -> torch.Tensor:
    # A per-group loop over transposed *views*: BLAS reads a^T in place. (The native 2D x 2D
    # grouped_mm wants a^T materialised, an (A, D) copy per call that cost more than it saved on CPU.
    # On CUDA this loop means E small GEMMs and one host sync; unmeasured there so far.)
    return _grouped_wgrad_eager(a_AD, g_AH, offs_E, num_groups)


@_grouped_mm_wgrad.register_fake
def _(a_AD, g_AH, offs_E, num_groups):
    return a_AD.new_empty(num_groups, a_AD.shape[1], g_AH.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    a_AD, b_EDH, offs_E = inputs
    ctx.save_for_backward(a_AD, b_EDH, offs_E)


def _grouped_mm_backward(ctx, grad_AH):
    a_AD, b_EDH, offs_E = ctx.saved_tensors
    grad_a = grouped_mm(grad_AH, b_EDH.transpose(1, 2), offs_E)                # dA = dY @ B^T per group
    grad_b = _grouped_mm_wgrad(a_AD, grad_AH, offs_E, b_EDH.shape[0])          # dB = A^T @ dY per group
    return grad_a, grad_b, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


# ----------------------------------------------------------------------------------------------------
# The three dispatch implementations. Each returns (y_TD, dropped_TK).
# ----------------------------------------------------------------------------------------------------

def _expert_mlp(x_ND, w_in_DH, w_out_HD):
    return F.gelu(x_ND @ w_in_DH) @ w_out_HD


def _moe_loop(x_TD, idx_TK, gates_TK, w_in_EDH, w_out_EHD, capacity_factor):
    y_TD = torch.zeros_like(x_TD)
    for e in range(w_in_EDH.shape[0]):
        tok_N, slot_N = torch.where(idx_TK == e)             # which (token, slot) pairs chose e
        if tok_N.numel() == 0:
            continue
        out_ND = _expert_mlp(x_TD[tok_N], w_in_EDH[e], w_out_EHD[e])
        y_TD = y_TD.index_add(0, tok_N, out_ND * gates_TK[tok_N, slot_N, None])
    return y_TD, torch.zeros_like(idx_TK, dtype=torch.bool)


def _moe_grouped(x_TD, idx_TK, gates_TK, w_in_EDH, w_out_EHD, capacity_factor):
    T, K = idx_TK.shape
    E = w_in_EDH.shape[0]
    idx_A = idx_TK.reshape(-1)                                  # assignment a = t*K + k
    order_A = torch.argsort(idx_A, stable=True)                  # assignments grouped by expert
    tok_A = order_A // K                                         # token of each sorted assignment
    # tokens per expert without .tolist(): a one-hot sum keeps every shape static
    counts_E = F.one_hot(idx_A, E).sum(0)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)           # end row of each expert's group
    h_AH = F.gelu(grouped_mm(x_TD[tok_A], w_in_EDH, offs_E))
    out_AD = grouped_mm(h_AH, w_out_EHD, offs_E)
    out_AD = out_AD * gates_TK.reshape(-1)[order_A, None]
    y_TD = torch.zeros_like(x_TD).index_add(0, tok_A, out_AD)
    return y_TD, torch.zeros_like(idx_TK, dtype=torch.bool)


def capacity(num_tokens, top_k, num_experts, capacity_factor):
    """C = ceil(cf * T*K / E) slots per expert (at least 1)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def _moe_capacity(x_TD, idx_TK, gates_TK, w_in_EDH, w_out_EHD, capacity_factor):
    T, K = idx_TK.shape
    E, D, H = w_in_EDH.shape
    C = capacity(T, K, E, capacity_factor)
    idx_A = idx_TK.reshape(-1)
    onehot_AE = F.one_hot(idx_A, E)
    # position of each assignment in its expert's queue, in token order (t*K + k)
    pos_A = ((torch.cumsum(onehot_AE, 0) - 1) * onehot_AE).sum(1)
    keep_A = pos_A < C
    # flat slot in an (E*C + 1)-row buffer; the extra last row is a bin for dropped assignments
    slot_A = torch.where(keep_A, idx_A * C + pos_A, torch.full_like(idx_A, E * C))
    tok_A = torch.arange(T * K, device=x_TD.device) // K
    buf_SD = x_TD.new_zeros(E * C + 1, D).index_copy(0, slot_A, x_TD[tok_A])   # bin row: garbage
    buf_ECD = buf_SD[: E * C].view(E, C, D)
    out_ECD = torch.bmm(F.gelu(torch.bmm(buf_ECD, w_in_EDH)), w_out_EHD)
    out_SD = torch.cat([out_ECD.reshape(E * C, D), out_ECD.new_zeros(1, D)])
    w_A = gates_TK.reshape(-1) * keep_A.to(gates_TK.dtype)                      # dropped -> weight 0
    y_TD = torch.zeros_like(x_TD).index_add(0, tok_A, out_SD[slot_A] * w_A[:, None])
    return y_TD, ~keep_A.view(T, K)


_IMPL_FNS = {"loop": _moe_loop, "grouped": _moe_grouped, "capacity": _moe_capacity}
_COMPILED = {}


def _compiled(impl):
    if impl not in _COMPILED:
        _COMPILED[impl] = torch.compile(_IMPL_FNS[impl], fullgraph=True, dynamic=False)
    return _COMPILED[impl]


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------

def _check_inputs(x_TD, idx_TK, gates_TK, w_in_EDH, w_out_EHD, impl, capacity_factor):
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(impl in IMPLS, f"impl: expected one of {IMPLS}, got {impl!r}")
    for name, t, nd in (("x_TD", x_TD, 2), ("expert_idx_TK", idx_TK, 2), ("gates_TK", gates_TK, 2),
                        ("w_in", w_in_EDH, 3), ("w_out", w_out_EHD, 3)):
        need(isinstance(t, torch.Tensor), f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        need(t.dim() == nd, f"{name}: expected {nd} dims, got shape {tuple(t.shape)}")
    for name, t in (("x_TD", x_TD), ("gates_TK", gates_TK), ("w_in", w_in_EDH), ("w_out", w_out_EHD)):
        need(t.is_floating_point(), f"{name}: expected a floating-point tensor, got {t.dtype}")
    need(not idx_TK.is_floating_point() and not idx_TK.is_complex() and idx_TK.dtype != torch.bool,
         f"expert_idx_TK: expected an integer tensor, got {idx_TK.dtype}")
    T, D = x_TD.shape
    E, D_in, H = w_in_EDH.shape
    need(D_in == D, f"w_in: expected shape (E, {D}, H) to match x_TD's D={D}, got {tuple(w_in_EDH.shape)}")
    need(tuple(w_out_EHD.shape) == (E, H, D),
         f"w_out: expected shape {(E, H, D)} to match w_in, got {tuple(w_out_EHD.shape)}")
    need(idx_TK.shape[0] == T, f"expert_idx_TK: expected {T} rows (one per token), got {idx_TK.shape[0]}")
    K = idx_TK.shape[1]
    need(1 <= K <= E, f"expert_idx_TK: top-k K={K} must be between 1 and the number of experts E={E}")
    need(tuple(gates_TK.shape) == (T, K),
         f"gates_TK: expected shape {(T, K)} like expert_idx_TK, got {tuple(gates_TK.shape)}")
    if impl == "capacity":
        need(capacity_factor > 0, f"capacity_factor: impl='capacity' needs a value > 0, got {capacity_factor}")
    # a value check needs a device sync, and is data-dependent: skip it while being traced
    if idx_TK.numel() and not torch.compiler.is_compiling():
        lo, hi = int(idx_TK.min()), int(idx_TK.max())
        need(lo >= 0 and hi < E, f"expert_idx_TK: ids must be in [0, {E}), got values in [{lo}, {hi}]")


def moe_ffn(x_TD, expert_idx_TK, gates_TK, w_in, w_out, impl="grouped", capacity_factor=0.0,
            compile=False):
    """Top-k MoE FFN with GELU experts.

    x_TD (T, D) float; expert_idx_TK (T, K) int in [0, E); gates_TK (T, K) float (cast to x's dtype);
    w_in (E, D, H); w_out (E, H, D). Returns (y_TD (T, D), dropped_TK (T, K) bool).
    impl: "loop" | "grouped" | "capacity"; capacity_factor (>0) only for "capacity".
    compile: torch.compile the implementation (lazily, once per impl; one graph, no recompiles when
    only the routing changes).
    """
    _check_inputs(x_TD, expert_idx_TK, gates_TK, w_in, w_out, impl, capacity_factor)
    fn = _compiled(impl) if compile and impl != "loop" else _IMPL_FNS[impl]
    return fn(x_TD, expert_idx_TK.long(), gates_TK.to(x_TD.dtype), w_in, w_out, float(capacity_factor))

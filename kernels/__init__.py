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
                the reference for speed and the oracle of kernels.bench. Data-dependent shapes: no
                single graph.
    "grouped"   sort the A = T*K assignments by expert, gather the rows, run ONE grouped GEMM per
                weight over int32 offsets (offsets are values, not shapes), undo the sort with the
                inverse permutation and sum each token's K slots with its gates. Every shape depends
                only on (T, K, D, H, E): torch.compile(fullgraph=True) builds one graph for any
                routing.
    "capacity"  a fixed [E, C, D] buffer per expert, C = ceil(capacity_factor * T*K / E), two bmm's.
                Assignments past C are DROPPED (the token keeps only its residual path for that
                slot). Priority is token order: assignment (t, k) is the (t*K + k)-th in line for
                its expert.
                Also compiles as one graph.
Only "capacity" ever drops; for the others `dropped_TK` is all False.

What a GPU training step needs from "grouped" (and how tests/test_kernels.py checks it on a CPU;
tests/test_gpu.py checks it on a GPU):
  * no host syncs on the native route: expert ids are checked on the device
    (torch._assert_async); the synchronous check with a readable ValueError runs only with
    debug=True. Group ends come from searchsorted on the sorted ids, never from .tolist() /
    bincount. (Tested: no aten op that reads a tensor on the host runs, and moe_testbed's whole
    MoE layer compiles with fullgraph=True.) "capacity" has no host reads either.
  * deterministic: the combine is a gather by the inverse permutation and a sum over the K slots,
    and the dispatch gradient a gather back and a sum over a token's K copies -- no index_add /
    atomics.
  * grouped forward AND backward: both gradient GEMMs are grouped GEMMs too (dX = dY @ W^T per
    group, dW = X^T @ dY per group, the latter a 2D x 2D grouped GEMM); no per-expert Python loop.

The grouped GEMM `grouped_mm(a, b, offs)` takes one of two routes, chosen by ONE pure function,
`grouped_route(device_type, capability, dtype, aligned)`, from what is static under compile:
  "native"  torch._grouped_mm: on CUDA only sm90 (Hopper), bf16, 16-byte-aligned rows; on the
            CPU bf16 or fp32 with aligned rows. Eagerly (and in bf16 under compile) torch's own
            autograd runs all three GEMMs grouped, visible to Inductor; fp32 on the CPU under
            compile goes through the custom op below, with torch._grouped_mm inside (its
            compile-time check accepts bf16 alone).
  "loop"    a custom op (`moe_kernels::grouped_mm`, opaque to torch.compile, so the graph stays
            whole) that loops over the groups: always correct, computed in the operands' dtype
            (fp32 stays fp32), but it reads the group ends on the host: 6 host syncs per MoE
            layer per forward + backward (one per grouped GEMM: 2 forward, 2 input-gradient,
            2 weight-gradient). It serves float64, odd widths, fp32 on CUDA (torch's CUDA kernel
            is bf16 only), GPUs before Hopper, and Blackwell (sm100, sm103), where torch's grouped
            GEMM is reported to give experts that got no token non-zero weight gradients
            (pytorch/pytorch#172439) and NaN gradients from the second backward on
            (pytorch/pytorch#193633), both open when this was written.
`dispatch_route(device, dtype, D, H)` names the route moe_ffn takes for contiguous weights:
moe_testbed.py prints it and records it in results.json.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["moe_ffn", "IMPLS", "grouped_mm", "capacity", "grouped_route", "dispatch_route"]

IMPLS = ("loop", "grouped", "capacity")


# -------------------------------------------------------------------------------------------------
# The grouped GEMM: out[rows of group g] = a[rows of group g] @ b[g], groups end at int32 offsets.
# -------------------------------------------------------------------------------------------------

def grouped_route(device_type, capability, dtype, aligned):
    """The grouped GEMM's route: "native" (torch._grouped_mm) or "loop" (the per-group fallback).
    device_type: "cuda", "cpu", ...; capability: (major, minor) on CUDA, else None; aligned: every
    non-unit stride of the operands is a multiple of 16 bytes. Pure: tested on the CPU."""
    if not aligned:
        return "loop"
    if device_type == "cuda":
        # Hopper only. Not sm100/sm103 (Blackwell): torch's grouped GEMM there is reported to give
        # idle experts non-zero weight gradients (pytorch/pytorch#172439) and NaN gradients from
        # the second backward on (pytorch/pytorch#193633), both open. fp32: the CUDA kernel is
        # bf16 only, and fp32 run as bf16 would change the precision unasked: the loop, in fp32.
        hopper = capability is not None and capability[0] == 9
        return "native" if hopper and dtype == torch.bfloat16 else "loop"
    if device_type == "cpu":
        return "native" if dtype in (torch.bfloat16, torch.float32) else "loop"
    return "loop"


def _device_of(device):
    """(device type, (major, minor) on CUDA else None). A function of its own so that tests can
    pretend that CPU tensors sit on a given GPU: the route that GPU would take then runs here."""
    if device.type != "cuda":
        return device.type, None
    props = torch.cuda.get_device_properties(device)
    return "cuda", (props.major, props.minor)


def _native_ok(*mats):
    """Does grouped_route send these operands to torch._grouped_mm? (dtype, device, strides)"""
    a = mats[0]
    if not hasattr(torch, "_grouped_mm") or any(m.dtype != a.dtype or m.device != a.device
                                                for m in mats):
        return False
    # every stride but the unit one must be a multiple of 16 bytes (row- or column-major operands)
    aligned = all(m.stride(-1) == 1 or m.stride(-2) == 1 for m in mats) and all(
        (st * m.element_size()) % 16 == 0 for m in mats for st in m.stride()[-2:] if st != 1)
    return grouped_route(*_device_of(a.device), a.dtype, aligned) == "native"


def dispatch_route(device, dtype, D, H):
    """The route of impl="grouped" for contiguous weights (E, D, H), (E, H, D) in dtype."""
    aligned = all(n * dtype.itemsize % 16 == 0 for n in (D, H))
    route = grouped_route(*_device_of(torch.device(device)), dtype, aligned)
    return route if hasattr(torch, "_grouped_mm") else "loop"


def _grouped_mm_loop(a_AD, b_EDH, offs_E):
    """The fallback: one matmul per group. offs_E[g] = end row of group g (read on the host)."""
    out_AH = a_AD.new_zeros(a_AD.shape[0], b_EDH.shape[-1])
    start = 0
    for g, end in enumerate(offs_E.tolist()):
        if end > start:
            out_AH[start:end] = a_AD[start:end] @ b_EDH[g]
        start = end
    return out_AH


def _grouped_wgrad_loop(a_AD, g_AH, offs_E, num_groups):
    """dW[g] = a[rows of g]^T @ g[rows of g]  ->  (E, D, H); the fallback of _grouped_wgrad."""
    out_EDH = a_AD.new_zeros(num_groups, a_AD.shape[1], g_AH.shape[1])
    start = 0
    for g, end in enumerate(offs_E.tolist()):
        if end > start:
            out_EDH[g] = a_AD[start:end].T @ g_AH[start:end]
        start = end
    return out_EDH


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def _grouped_mm_op(a_AD: torch.Tensor, b_EDH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    if _native_ok(a_AD, b_EDH):
        return torch._grouped_mm(a_AD, b_EDH, offs=offs_E)   # b may be a transposed view
    return _grouped_mm_loop(a_AD, b_EDH, offs_E)


@_grouped_mm_op.register_fake
def _(a_AD, b_EDH, offs_E):
    return a_AD.new_empty(a_AD.shape[0], b_EDH.shape[-1])


@torch.library.custom_op("moe_kernels::grouped_wgrad", mutates_args=())
def _grouped_wgrad(a_AD: torch.Tensor, g_AH: torch.Tensor, offs_E: torch.Tensor,
                   num_groups: int) -> torch.Tensor:
    # 2D x 2D grouped GEMM: the shared dim A is split into groups. a^T is a view (no copy); on the
    # CPU it measured no slower than the per-group loop in bf16 and faster in fp32.
    if _native_ok(a_AD.t(), g_AH):
        return torch._grouped_mm(a_AD.t(), g_AH, offs=offs_E)
    return _grouped_wgrad_loop(a_AD, g_AH, offs_E, num_groups)


@_grouped_wgrad.register_fake
def _(a_AD, g_AH, offs_E, num_groups):
    return a_AD.new_empty(num_groups, a_AD.shape[1], g_AH.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    a_AD, b_EDH, offs_E = inputs
    ctx.save_for_backward(a_AD, b_EDH, offs_E)


def _grouped_mm_backward(ctx, grad_AH):
    a_AD, b_EDH, offs_E = ctx.saved_tensors
    # torch._grouped_mm rejects zero-stride gradients
    grad_AH = grad_AH.contiguous()
    # dA = dY @ B^T per group
    grad_a = _grouped_mm_op(grad_AH, b_EDH.transpose(1, 2), offs_E)
    # dB = A^T @ dY per group
    grad_b = _grouped_wgrad(a_AD, grad_AH, offs_E, b_EDH.shape[0])
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(a_AD, b_EDH, offs_E):
    """(A, D) x (E, D, H) -> (A, H): rows offs_E[g-1]:offs_E[g] of `a` multiply b[g] (offs_E int32,
    ends). Differentiable in a and b, computed in the operands' dtype. The route (module docstring)
    depends on device, dtype and strides only. The native route keeps torch's rule that the backward
    rejects a zero-stride gradient (that of y.sum())."""
    if _native_ok(a_AD, b_EDH) and (a_AD.dtype == torch.bfloat16
                                    or not torch.compiler.is_compiling()):
        return torch._grouped_mm(a_AD, b_EDH, offs=offs_E)       # native, torch's autograd
    return _grouped_mm_op(a_AD, b_EDH, offs_E)   # loop, or native inside (CPU fp32 compiled)


# -------------------------------------------------------------------------------------------------
# The three dispatch implementations. Each returns (y_TD, dropped_TK).
# -------------------------------------------------------------------------------------------------

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


@torch.library.custom_op("moe_kernels::index_rows", mutates_args=())
def _index_rows_op(x_ND: torch.Tensor, rows_A: torch.Tensor) -> torch.Tensor:
    return x_ND.index_select(0, rows_A)


@_index_rows_op.register_fake
def _(x_ND, rows_A):
    return x_ND.new_empty(rows_A.shape[0], x_ND.shape[1])


def _index_rows(x_ND, rows_A):
    """x[rows] by index_select (faster than x[rows] on CPU). On CPU it is kept opaque to Inductor,
    whose generated gather loops made the compiled step slower than the eager one (docs/kernels.md);
    on a GPU Inductor may fuse it."""
    if x_ND.device.type == "cpu":
        return _index_rows_op(x_ND, rows_A)
    return x_ND.index_select(0, rows_A)


class _GatherRows(torch.autograd.Function):
    """out[r] = x[rows[r]], where every row of x is read by exactly K rows of out (K = 1: a
    permutation). inv lists, for each (row i of x, copy k) in order i*K + k, the out row that read
    it. The gradient is then a gather by inv and a sum over each row's K copies in slot order --
    where autograd's own would be an accumulating scatter (atomic adds on CUDA)."""

    @staticmethod
    def forward(ctx, x_ND, rows_A, inv_A, K):
        ctx.save_for_backward(inv_A)
        ctx.K = K
        return _index_rows(x_ND, rows_A)

    @staticmethod
    def backward(ctx, grad_AD):
        (inv_A,) = ctx.saved_tensors
        grad_AD = _index_rows(grad_AD.contiguous(), inv_A)             # back to order i*K + k
        if ctx.K > 1:
            # a row's K copies, k = 0..K-1
            grad_AD = grad_AD.view(-1, ctx.K, grad_AD.shape[-1]).sum(1)
        return grad_AD, None, None, None


def _moe_grouped(x_TD, idx_TK, gates_TK, w_in_EDH, w_out_EHD, capacity_factor):
    T, K = idx_TK.shape
    E, D, _ = w_in_EDH.shape
    idx_A = idx_TK.reshape(-1)                                   # assignment a = t*K + k
    # sorted row r holds assignment order_A[r]
    order_A = torch.argsort(idx_A, stable=True)
    inv_A = torch.empty_like(order_A).scatter_(0, order_A, torch.arange(T * K, device=idx_A.device))
    # end row of expert e's group = number of assignments with id <= e (no counts read on the host)
    experts_E = torch.arange(E, device=idx_A.device, dtype=idx_A.dtype)
    offs_E = torch.searchsorted(idx_A[order_A], experts_E, right=True, out_int32=True)
    x_AD = _GatherRows.apply(x_TD, order_A // K, inv_A, K)        # token rows, sorted by expert
    h_AH = F.gelu(grouped_mm(x_AD, w_in_EDH, offs_E))
    out_AD = grouped_mm(h_AH, w_out_EHD, offs_E)
    # back to (token, slot) order
    out_TKD = _GatherRows.apply(out_AD, inv_A, order_A, 1).view(T, K, D)
    y_TD = (gates_TK.unsqueeze(-1) * out_TKD).sum(1)              # y_t = sum_k g_tk E_{idx_tk}(x_t)
    return y_TD, torch.zeros_like(idx_TK, dtype=torch.bool)


def capacity(num_tokens, top_k, num_experts, capacity_factor):
    """C = ceil(cf * T*K / E) slots per expert (at least 1)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def _slots(x_TD, K):
    """(T, D) -> (T*K, D): row t*K + k is token t. Its gradient sums a token's K copies (no
    atomics)."""
    T, D = x_TD.shape
    return x_TD.unsqueeze(1).expand(T, K, D).reshape(T * K, D)


def _moe_capacity(x_TD, idx_TK, gates_TK, w_in_EDH, w_out_EHD, capacity_factor):
    T, K = idx_TK.shape
    E, D, H = w_in_EDH.shape
    C = capacity(T, K, E, capacity_factor)
    idx_A = idx_TK.reshape(-1)
    # one-hot by comparison: F.one_hot reads the ids' min and max on the host (on CPU)
    onehot_AE = (idx_A.unsqueeze(1) == torch.arange(E, device=idx_A.device)).long()
    # position of each assignment in its expert's queue, in token order (t*K + k)
    pos_A = ((torch.cumsum(onehot_AE, 0) - 1) * onehot_AE).sum(1)
    keep_A = pos_A < C
    # flat slot in an (E*C + 1)-row buffer; the extra last row is a bin for dropped assignments
    slot_A = torch.where(keep_A, idx_A * C + pos_A, torch.full_like(idx_A, E * C))
    # bin row: garbage
    buf_SD = x_TD.new_zeros(E * C + 1, D).index_copy(0, slot_A, _slots(x_TD, K))
    buf_ECD = buf_SD[: E * C].view(E, C, D)
    out_ECD = torch.bmm(F.gelu(torch.bmm(buf_ECD, w_in_EDH)), w_out_EHD)
    out_SD = torch.cat([out_ECD.reshape(E * C, D), out_ECD.new_zeros(1, D)])
    # dropped -> weight 0
    w_A = gates_TK.reshape(-1) * keep_A.to(gates_TK.dtype)
    y_TD = (out_SD[slot_A] * w_A[:, None]).view(T, K, D).sum(1)
    return y_TD, ~keep_A.view(T, K)


_IMPL_FNS = {"loop": _moe_loop, "grouped": _moe_grouped, "capacity": _moe_capacity}
_COMPILED = {}


def _compiled(impl):
    if impl not in _COMPILED:
        _COMPILED[impl] = torch.compile(_IMPL_FNS[impl], fullgraph=True, dynamic=False)
    return _COMPILED[impl]


# -------------------------------------------------------------------------------------------------
# Public entry point
# -------------------------------------------------------------------------------------------------

def _check_inputs(x_TD, idx_TK, gates_TK, w_in_EDH, w_out_EHD, impl, capacity_factor, debug):
    """Types and shapes (free: no tensor is read). Expert ids: on the device, or on the host with
    debug."""
    def need(cond, msg):
        if not cond:
            raise ValueError(msg)

    need(impl in IMPLS, f"impl: expected one of {IMPLS}, got {impl!r}")
    for name, t, nd in (("x_TD", x_TD, 2), ("expert_idx_TK", idx_TK, 2), ("gates_TK", gates_TK, 2),
                        ("w_in", w_in_EDH, 3), ("w_out", w_out_EHD, 3)):
        need(isinstance(t, torch.Tensor),
             f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        need(t.dim() == nd, f"{name}: expected {nd} dims, got shape {tuple(t.shape)}")
    for name, t in (("x_TD", x_TD), ("gates_TK", gates_TK), ("w_in", w_in_EDH),
                    ("w_out", w_out_EHD)):
        need(t.is_floating_point(), f"{name}: expected a floating-point tensor, got {t.dtype}")
    need(not idx_TK.is_floating_point() and not idx_TK.is_complex() and idx_TK.dtype != torch.bool,
         f"expert_idx_TK: expected an integer tensor, got {idx_TK.dtype}")
    T, D = x_TD.shape
    E, D_in, H = w_in_EDH.shape
    need(D_in == D,
         f"w_in: expected shape (E, {D}, H) to match x_TD's D={D}, got {tuple(w_in_EDH.shape)}")
    need(tuple(w_out_EHD.shape) == (E, H, D),
         f"w_out: expected shape {(E, H, D)} to match w_in, got {tuple(w_out_EHD.shape)}")
    need(idx_TK.shape[0] == T,
         f"expert_idx_TK: expected {T} rows (one per token), got {idx_TK.shape[0]}")
    K = idx_TK.shape[1]
    need(1 <= K <= E,
         f"expert_idx_TK: top-k K={K} must be between 1 and the number of experts E={E}")
    need(tuple(gates_TK.shape) == (T, K),
         f"gates_TK: expected shape {(T, K)} like expert_idx_TK, got {tuple(gates_TK.shape)}")
    if impl == "capacity":
        need(capacity_factor > 0,
             f"capacity_factor: impl='capacity' needs a value > 0, got {capacity_factor}")
    if idx_TK.numel() == 0:
        return
    if debug and not torch.compiler.is_compiling():   # reads two numbers on the host: a device sync
        lo, hi = int(idx_TK.min()), int(idx_TK.max())
        need(lo >= 0 and hi < E,
             f"expert_idx_TK: ids must be in [0, {E}), got values in [{lo}, {hi}]")
    else:                                             # on the device: a CUDA assert fires later
        torch._assert_async(((idx_TK >= 0) & (idx_TK < E)).all(),
                            f"expert_idx_TK: ids must be in [0, {E}) "
                            "(debug=True names the bad values)")


def moe_ffn(x_TD, expert_idx_TK, gates_TK, w_in, w_out, impl="grouped", capacity_factor=0.0,
            compile=False, debug=False):
    """Top-k MoE FFN with GELU experts.

    x_TD (T, D) float; expert_idx_TK (T, K) int in [0, E); gates_TK (T, K) float (cast to x's
    dtype); w_in (E, D, H); w_out (E, H, D). Returns (y_TD (T, D), dropped_TK (T, K) bool). impl:
    "loop" | "grouped" | "capacity"; capacity_factor (>0) only for "capacity". compile:
    torch.compile the implementation (lazily, once per impl; one graph, no recompiles when only the
    routing changes). The function can also be traced as part of a larger compiled module. debug:
    check the expert ids on the host (a device sync) and raise ValueError; without it an
    out-of-range id trips an on-device assert (RuntimeError; on CUDA, asynchronously)."""
    _check_inputs(x_TD, expert_idx_TK, gates_TK, w_in, w_out, impl, capacity_factor, debug)
    fn = _compiled(impl) if compile and impl != "loop" else _IMPL_FNS[impl]
    return fn(x_TD, expert_idx_TK.long(), gates_TK.to(x_TD.dtype), w_in, w_out,
              float(capacity_factor))

"""Persistent grouped GEMM (forward, dX and dW) in Triton, with a torch.autograd.Function.

out[rows of g] = x[rows of g] @ B[g], where the rows of ``x`` [M, K] are split into G consecutive
groups by ``m_sizes`` [G] (a device tensor: never read on the host) and B[g] is ``w[g]^T`` for
``w`` [G, N, K] or ``w[g]`` for ``w`` [G, K, N] (``transposed_w=True``).

Kernel design (see the persistent cache-aware grouped GEMM and MetaShuffling notes):

- persistent: the grid is one program per SM; each program walks the global tile list
  (group by group, then the zero tiles of the rows past ``sum(m_sizes)``) with stride = grid size;
- grouped launch order inside a group: GROUP_M row tiles share a column band, so consecutive
  programs reuse the same weight tile from L2;
- empty groups cost one scalar load and never touch their weights;
- Hopper + a Triton with ``tl.make_tensor_descriptor``: activations and weights are loaded with
  device-side TMA descriptors (one per group for the weights); elsewhere plain masked loads;
- float32 accumulation, output in the input dtype.

dX reuses the forward kernel with the weight read the other way round; dW[g] = X_g^T dY_g is a
second persistent kernel whose tiles are (group, n-tile, k-tile) and whose inner loop runs over the
group's rows (offsets computed on device).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from posttrain.kernels.launch import (
    LazyKernel,
    interpreter_enabled,
    num_programs,
    prepare_tma,
    use_tma,
)

_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


def _fwd_configs() -> list[triton.Config]:
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 128, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 256, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _wgrad_configs() -> list[triton.Config]:
    shapes = [(64, 128, 128, 8, 3), (64, 128, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 128, 4, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _grouped_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # weights; B[g][k, n] = w_ptr[g * stride_wg + k * stride_bk + n * stride_bn]
    out_ptr,  # [M, N]
    m_sizes_ptr,  # [G] int
    M,
    N,
    K,
    G,
    M_BUCKET,  # autotune key only: next power of two of M
    stride_xm,
    stride_xk,
    stride_wg,
    stride_bk,
    stride_bn,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
    B_N_CONTIGUOUS: tl.constexpr,  # TMA only: stride_bn == 1 (else stride_bk == 1)
    UPCAST_DOT: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong; fp32 products are exact
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    if USE_TMA:
        x_desc = tl.make_tensor_descriptor(
            x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K]
        )

    tile = pid  # global id of the next tile this program owns
    tiles_before = 0  # tiles of the groups already passed
    m_start = 0  # first row of group g
    for g in range(G):
        m_size = tl.load(m_sizes_ptr + g).to(tl.int32)
        num_m_tiles = tl.cdiv(m_size, BLOCK_M)
        group_tiles = num_m_tiles * num_n_tiles
        if USE_TMA:
            # One device-side descriptor per group: the expert is only known at run time.
            if B_N_CONTIGUOUS:
                w_desc = tl.make_tensor_descriptor(
                    w_ptr + g * stride_wg,
                    shape=[K, N],
                    strides=[stride_bk, 1],
                    block_shape=[BLOCK_K, BLOCK_N],
                )
            else:
                w_desc = tl.make_tensor_descriptor(
                    w_ptr + g * stride_wg,
                    shape=[N, K],
                    strides=[stride_bn, 1],
                    block_shape=[BLOCK_N, BLOCK_K],
                )
        while tile < tiles_before + group_tiles:
            local = tile - tiles_before
            # Grouped launch order: walk GROUP_M row tiles down one column band, then move right.
            band_tiles = GROUP_M * num_n_tiles
            first_m = (local // band_tiles) * GROUP_M
            band_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
            pid_m = first_m + (local % band_tiles) % band_rows
            pid_n = (local % band_tiles) // band_rows
            row0 = m_start + pid_m * BLOCK_M
            offs_m = row0 + offs_m0
            offs_n = pid_n * BLOCK_N + offs_n0
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + offs_k0
                if USE_TMA:
                    # Rows of the next group are loaded too and masked out at the store.
                    a = x_desc.load([row0, k0])
                    if B_N_CONTIGUOUS:
                        b = w_desc.load([k0, pid_n * BLOCK_N])
                    else:
                        b = tl.trans(w_desc.load([pid_n * BLOCK_N, k0]))
                else:
                    a_mask = (offs_m[:, None] < m_start + m_size) & (offs_k[None, :] < K)
                    a = tl.load(
                        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=a_mask,
                        other=0.0,
                    )
                    b_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
                    b = tl.load(
                        w_ptr + g * stride_wg + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=b_mask,
                        other=0.0,
                    )
                if UPCAST_DOT:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
                else:
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            o_mask = (offs_m[:, None] < m_start + m_size) & (offs_n[None, :] < N)
            tl.store(
                out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                acc.to(out_ptr.dtype.element_ty),
                mask=o_mask,
            )
            tile += step
        tiles_before += group_tiles
        m_start += m_size

    # Rows past sum(m_sizes) belong to no group: they are written as zeros.
    tail_tiles = tl.cdiv(M - m_start, BLOCK_M) * num_n_tiles
    zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32).to(out_ptr.dtype.element_ty)
    while tile < tiles_before + tail_tiles:
        local = tile - tiles_before
        offs_m = m_start + (local // num_n_tiles) * BLOCK_M + offs_m0
        offs_n = (local % num_n_tiles) * BLOCK_N + offs_n0
        o_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, zeros, mask=o_mask)
        tile += step


def _wgrad_kernel(
    x_ptr,  # [M, K] forward input
    dy_ptr,  # [M, N] output gradient
    dw_ptr,  # dW[g][n, k] at dw_ptr[g * stride_cg + n * stride_cn + k * stride_ck]
    m_sizes_ptr,  # [G] int
    m_starts_ptr,  # [G] int: exclusive prefix sum of m_sizes
    N,
    K,
    G,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyn,
    stride_cg,
    stride_cn,
    stride_ck,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_group = num_n_tiles * num_k_tiles
    for tile in range(pid, G * tiles_per_group, tl.num_programs(0)):
        g = tile // tiles_per_group
        pid_n = (tile % tiles_per_group) // num_k_tiles
        pid_k = tile % num_k_tiles
        m_start = tl.load(m_starts_ptr + g).to(tl.int32)
        m_end = m_start + tl.load(m_sizes_ptr + g).to(tl.int32)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < m_end
            dy_t = tl.load(
                dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                mask=m_mask[None, :] & (offs_n[:, None] < N),
                other=0.0,
            )  # [BLOCK_N, BLOCK_M]
            xt = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & (offs_k[None, :] < K),
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            if UPCAST_DOT:
                acc = tl.dot(dy_t.to(tl.float32), xt.to(tl.float32), acc)
            else:
                acc = tl.dot(dy_t, xt, acc, input_precision=INPUT_PRECISION)
        c_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        tl.store(
            dw_ptr + g * stride_cg + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck,
            acc.to(dw_ptr.dtype.element_ty),
            mask=c_mask,
        )


_FWD = LazyKernel(_grouped_gemm_kernel, _fwd_configs, ("N", "K", "G", "M_BUCKET"))
_WGRAD = LazyKernel(_wgrad_kernel, _wgrad_configs, ("N", "K", "G", "M_BUCKET"))


def _dot_flags(dtype: torch.dtype) -> dict[str, object]:
    interpret = interpreter_enabled()
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST_DOT": interpret, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _tma_ok(x: torch.Tensor, w: torch.Tensor, stride_bk: int, stride_bn: int) -> bool:
    if not use_tma(x.device) or x.stride(1) != 1 or min(stride_bk, stride_bn) != 1:
        return False
    size = x.element_size()
    strides = (x.stride(0), w.stride(0), max(stride_bk, stride_bn))
    return all(s * size % 16 == 0 for s in strides) and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def _check(x: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor, transposed_w: bool) -> None:
    k_w = w.shape[1] if transposed_w else (w.shape[2] if w.dim() == 3 else -1)
    if x.dim() != 2 or w.dim() != 3 or k_w != x.shape[1] or m_sizes.shape != (w.shape[0],):
        layout = "[G, K, N]" if transposed_w else "[G, N, K]"
        raise ValueError(
            f"grouped_gemm: expected x [M, K], w {layout}, m_sizes [G]; got x {tuple(x.shape)}, "
            f"w {tuple(w.shape)}, m_sizes {tuple(m_sizes.shape)}"
        )
    if x.dtype != w.dtype or x.device != w.device or m_sizes.device != x.device:
        raise ValueError(
            f"grouped_gemm: x and w must share dtype and device, m_sizes the device; got x {x.dtype}/{x.device}, "
            f"w {w.dtype}/{w.device}, m_sizes {m_sizes.device}"
        )


def grouped_gemm_forward(
    x: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor, transposed_w: bool = False
) -> torch.Tensor:
    """The forward kernel alone (no autograd); same contract as ``reference.grouped_gemm``."""
    _check(x, w, m_sizes, transposed_w)
    num_rows = x.shape[0]
    if transposed_w:  # w [G, K, N]
        n_out, stride_bk, stride_bn = w.shape[2], w.stride(1), w.stride(2)
    else:  # w [G, N, K]
        n_out, stride_bk, stride_bn = w.shape[1], w.stride(2), w.stride(1)
    out = torch.empty(num_rows, n_out, dtype=x.dtype, device=x.device)
    if num_rows == 0 or n_out == 0:
        return out
    groups, k_in = w.shape[0], x.shape[1]
    tma = _tma_ok(x, w, stride_bk, stride_bn)
    if tma:
        prepare_tma()
    max_programs = num_programs(x.device)

    def grid(meta: dict[str, int]) -> tuple[int]:
        upper = (triton.cdiv(num_rows, meta["BLOCK_M"]) + groups) * triton.cdiv(n_out, meta["BLOCK_N"])
        return (max(1, min(max_programs, upper)),)

    blocks = {} if _FWD.autotuned else {**_INTERPRETER_BLOCKS, "GROUP_M": 2}
    _FWD[grid](
        x,
        w,
        out,
        m_sizes,
        num_rows,
        n_out,
        k_in,
        groups,
        triton.next_power_of_2(num_rows),
        x.stride(0),
        x.stride(1),
        w.stride(0),
        stride_bk,
        stride_bn,
        out.stride(0),
        out.stride(1),
        USE_TMA=tma,
        B_N_CONTIGUOUS=stride_bn == 1,
        **_dot_flags(x.dtype),
        **blocks,
    )
    return out


def grouped_gemm_wgrad(
    x: torch.Tensor, dy: torch.Tensor, m_sizes: torch.Tensor, transposed_w: bool = False
) -> torch.Tensor:
    """dW of :func:`grouped_gemm`: [G, N, K] (or [G, K, N] if ``transposed_w``); zero for empty groups.

    ``x``: [M, K] forward input, ``dy``: [M, N] output gradient. float32 accumulation, result in
    ``x.dtype``.
    """
    groups = m_sizes.shape[0]
    n_out, k_in = dy.shape[1], x.shape[1]
    shape = (groups, k_in, n_out) if transposed_w else (groups, n_out, k_in)
    dw = torch.empty(shape, dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    m_starts = torch.cumsum(m_sizes, 0, dtype=torch.int32) - m_sizes.to(torch.int32)
    stride_cn, stride_ck = (dw.stride(2), dw.stride(1)) if transposed_w else (dw.stride(1), dw.stride(2))
    max_programs = num_programs(x.device)

    def grid(meta: dict[str, int]) -> tuple[int]:
        tiles = groups * triton.cdiv(n_out, meta["BLOCK_N"]) * triton.cdiv(k_in, meta["BLOCK_K"])
        return (max(1, min(max_programs, tiles)),)

    _WGRAD[grid](
        x,
        dy,
        dw,
        m_sizes,
        m_starts,
        n_out,
        k_in,
        groups,
        triton.next_power_of_2(max(x.shape[0], 1)),
        x.stride(0),
        x.stride(1),
        dy.stride(0),
        dy.stride(1),
        dw.stride(0),
        stride_cn,
        stride_ck,
        **_dot_flags(x.dtype),
        **({} if _WGRAD.autotuned else _INTERPRETER_BLOCKS),
    )
    return dw


class GroupedGemm(torch.autograd.Function):
    """Autograd wrapper: dX = grouped GEMM with the weights read transposed; dW by the wgrad kernel."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        w: torch.Tensor,
        m_sizes: torch.Tensor,
        transposed_w: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, w, m_sizes)
        ctx.transposed_w = transposed_w
        return grouped_gemm_forward(x, w, m_sizes, transposed_w)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, w, m_sizes = ctx.saved_tensors
        grad_out = grad_out.contiguous().to(x.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_gemm_forward(grad_out, w, m_sizes, not ctx.transposed_w)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_gemm_wgrad(x, grad_out, m_sizes, ctx.transposed_w)
        return grad_x, grad_w, None, None


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor, transposed_w: bool = False
) -> torch.Tensor:
    """Differentiable grouped GEMM; same contract as :func:`posttrain.kernels.reference.grouped_gemm`."""
    return GroupedGemm.apply(x, w, m_sizes, transposed_w)

"""Persistent grouped GEMM (forward, dX and dW) in Triton, with a torch.autograd.Function.

out[rows of g] = A[rows of g] @ B[g], where the rows of A [M, K] are split into G consecutive
groups by ``m_sizes`` [G] (a device tensor: never read on the host) and B[g] is ``w[g]^T`` for
``w`` [G, N, K] or ``w[g]`` for ``w`` [G, K, N] (``transposed_w=True``).

Kernel design (see the persistent cache-aware grouped GEMM and MetaShuffling notes):

- persistent: the grid is one program per SM; each program walks the global tile list
  (group by group, then the zero tiles of the rows past ``sum(m_sizes)``) with stride = grid size;
- grouped launch order inside a group: GROUP_M row tiles share a column band, so consecutive
  programs reuse the same weight tile from L2 (dW: GROUP_N n-tiles share an x band);
- empty groups cost one scalar load and never touch their weights;
- Hopper + a Triton with ``tl.make_tensor_descriptor``: operands loaded with device-side TMA
  descriptors, created once per program and group it has tiles in (the expert is only known at
  run time); the output is stored through a per-group descriptor whose row bound is the group's
  end (TMA clips the rows of the next group); elsewhere plain masked loads and stores;
- fused MoE variants: ``A_GATHER`` reads row ``a_idx[r]`` of A (the token of a routed pair) on
  device instead of a pre-gathered copy; ``SCATTER`` adds ``scale[r] * row r`` into
  ``out[c_idx[r]]`` (float32, atomics) instead of storing row r. dW has the same gathers;
- every element offset is computed in int64: row x stride and group x stride pass 2^31 at real
  sizes (DeepSeek-V3 gate_up_proj [256, 4096, 7168] from expert 74 on);
- float32 accumulation, output in the input dtype (float32 for SCATTER).

dX reuses the forward kernel with the weight read the other way round; dW[g] = A_g^T dY_g is a
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


# Shared memory per block on H100/H200 (227 KB), and what a config leaves free under our estimate
# for what it does not count: mbarriers, alignment padding, layout-conversion scratch.
SMEM_LIMIT_BYTES = 232448
SMEM_MARGIN_BYTES = 4096


def _fwd_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), largest first: the single-config mode takes the
    # first survivor of the pruning. The last two fit float32 (tf32) operands at any row count.
    shapes = [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (32, 128, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 64, 256, 4, 3),
        (64, 64, 32, 4, 3),
        (32, 64, 32, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _wgrad_configs() -> list[triton.Config]:
    shapes = [
        (64, 128, 128, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 128, 4, 3),
        (32, 64, 64, 4, 4),
        (32, 64, 32, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": 4}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def smem_estimate(config: triton.Config, in_bytes: int, out_bytes: int, wgrad: bool = False) -> int:
    """Shared memory (bytes) a config needs: its pipeline buffers plus one output tile.

    The pipeliner keeps ``num_stages`` copies of both operand tiles; the epilogue stages an output
    tile (the TMA store's source, or a layout conversion before the pointer store / atomics). The
    forward's operand tiles are A [BM, BK] and B [BK, BN], output [BM, BN]; the weight gradient
    reduces over BLOCK_M: dyᵀ [BN, BM] and x [BM, BK], output [BN, BK].
    """
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if wgrad:
        operands, out_tile = bn * bm + bm * bk, bn * bk
    else:
        operands, out_tile = bm * bk + bk * bn, bm * bn
    return config.num_stages * operands * in_bytes + out_tile * out_bytes


def _prune(configs: list, named_args: dict, in_ptr: str, out_ptr: str, wgrad: bool) -> list:
    """Configs that fit shared memory for these dtypes, then those with BLOCK_M near the rows per group.

    Shared memory: ``smem_estimate`` must stay ``SMEM_MARGIN_BYTES`` under ``SMEM_LIMIT_BYTES``
    (float32 operands double the tiles of bf16 ones). Rows: BLOCK_M far above the average rows
    per group wastes MMA rows; ``M_BUCKET`` (next power of two of the rows) and ``G`` are autotune
    keys, so the pruned set is fixed per key. Keeps the fitting configs with the smallest BLOCK_M
    when none is small enough.
    """
    in_bytes = named_args[in_ptr].element_size()
    out_bytes = named_args[out_ptr].element_size()
    budget = SMEM_LIMIT_BYTES - SMEM_MARGIN_BYTES
    fits = [c for c in configs if smem_estimate(c, in_bytes, out_bytes, wgrad) <= budget]
    if not fits:
        raise ValueError(f"grouped_gemm: no autotune config fits {budget} bytes of shared memory")
    avg_rows = max(16, int(named_args["M_BUCKET"]) // max(1, int(named_args["G"])))
    keep = [c for c in fits if c.kwargs["BLOCK_M"] <= 2 * avg_rows]
    if keep:
        return keep
    smallest = min(c.kwargs["BLOCK_M"] for c in fits)
    return [c for c in fits if c.kwargs["BLOCK_M"] == smallest]


def prune_fwd(configs: list, named_args: dict, **kwargs: object) -> list:
    """Early-config prune of the forward / dX kernel (see :func:`_prune`)."""
    return _prune(configs, named_args, "x_ptr", "out_ptr", wgrad=False)


def prune_wgrad(configs: list, named_args: dict, **kwargs: object) -> list:
    """Early-config prune of the dW kernel (see :func:`_prune`)."""
    return _prune(configs, named_args, "x_ptr", "dw_ptr", wgrad=True)


def _grouped_gemm_kernel(
    x_ptr,  # A: [M, K], or [T, K] read through a_idx when A_GATHER
    w_ptr,  # weights; B[g][k, n] = w_ptr[g * stride_wg + k * stride_bk + n * stride_bn]
    out_ptr,  # [M, N]; [T, N] float32 accumulated through c_idx when SCATTER
    m_sizes_ptr,  # [G] int
    a_idx_ptr,  # [M] int32: row of x for each GEMM row (A_GATHER)
    c_idx_ptr,  # [M] int32: output row for each GEMM row (SCATTER)
    scale_ptr,  # [M] float32: factor of each GEMM row in the scattered sum (SCATTER and HAS_SCALE)
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
    A_GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its bf16 tl.dot is wrong; fp32 products are exact
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    if USE_TMA and not A_GATHER:
        # Rows of the next group are loaded too and dropped at the store (clipped by out_desc).
        x_desc = tl.make_tensor_descriptor(
            x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K]
        )

    tile = pid  # global id of the next tile this program owns
    tiles_before = 0  # tiles of the groups already passed
    m_start = 0  # first row of group g
    for g in range(G):
        m_size = tl.load(m_sizes_ptr + g).to(tl.int32)
        m_end = m_start + m_size
        num_m_tiles = tl.cdiv(m_size, BLOCK_M)
        group_tiles = num_m_tiles * num_n_tiles
        if tile < tiles_before + group_tiles:  # this program has work in group g
            w_base = w_ptr + tl.cast(g, tl.int64) * stride_wg
            if USE_TMA:
                # Descriptors once per (program, group): the expert is only known at run time.
                if B_N_CONTIGUOUS:
                    w_desc = tl.make_tensor_descriptor(
                        w_base, shape=[K, N], strides=[stride_bk, 1], block_shape=[BLOCK_K, BLOCK_N]
                    )
                else:
                    w_desc = tl.make_tensor_descriptor(
                        w_base, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K]
                    )
                if not SCATTER:
                    out_desc = tl.make_tensor_descriptor(
                        out_ptr, shape=[m_end, N], strides=[stride_om, 1], block_shape=[BLOCK_M, BLOCK_N]
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
                m_valid = offs_m < m_end
                offs_n = pid_n * BLOCK_N + offs_n0
                if A_GATHER:
                    a_rows = tl.load(a_idx_ptr + offs_m, mask=m_valid, other=0).to(tl.int64)
                else:
                    a_rows = offs_m.to(tl.int64)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + offs_k0
                    if USE_TMA and not A_GATHER:
                        a = x_desc.load([row0, k0])
                    else:
                        a = tl.load(
                            x_ptr + a_rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                            mask=m_valid[:, None] & (offs_k[None, :] < K),
                            other=0.0,
                        )
                    if USE_TMA:
                        if B_N_CONTIGUOUS:
                            b = w_desc.load([k0, pid_n * BLOCK_N])
                        else:
                            b = tl.trans(w_desc.load([pid_n * BLOCK_N, k0]))
                    else:
                        b = tl.load(
                            w_base
                            + offs_k[:, None].to(tl.int64) * stride_bk
                            + offs_n[None, :].to(tl.int64) * stride_bn,
                            mask=(offs_k[:, None] < K) & (offs_n[None, :] < N),
                            other=0.0,
                        )
                    if UPCAST_DOT:
                        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
                    else:
                        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                o_mask = m_valid[:, None] & (offs_n[None, :] < N)
                col_off = offs_n[None, :].to(tl.int64) * stride_on
                if SCATTER:
                    # Epilogue scatter-add: out[c_idx[r]] += scale[r] * row r (k rows meet per token).
                    c_rows = tl.load(c_idx_ptr + offs_m, mask=m_valid, other=0).to(tl.int64)
                    if HAS_SCALE:
                        acc = acc * tl.load(scale_ptr + offs_m, mask=m_valid, other=0.0).to(tl.float32)[:, None]
                    tl.atomic_add(out_ptr + c_rows[:, None] * stride_om + col_off, acc, mask=o_mask, sem="relaxed")
                elif USE_TMA:
                    out_desc.store([row0, pid_n * BLOCK_N], acc.to(out_ptr.dtype.element_ty))
                else:
                    tl.store(
                        out_ptr + offs_m[:, None].to(tl.int64) * stride_om + col_off,
                        acc.to(out_ptr.dtype.element_ty),
                        mask=o_mask,
                    )
                tile += step
        tiles_before += group_tiles
        m_start = m_end

    if not SCATTER:
        # Rows past sum(m_sizes) belong to no group: they are written as zeros.
        tail_tiles = tl.cdiv(M - m_start, BLOCK_M) * num_n_tiles
        zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32).to(out_ptr.dtype.element_ty)
        while tile < tiles_before + tail_tiles:
            local = tile - tiles_before
            offs_m = m_start + (local // num_n_tiles) * BLOCK_M + offs_m0
            offs_n = (local % num_n_tiles) * BLOCK_N + offs_n0
            o_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(
                out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on,
                zeros,
                mask=o_mask,
            )
            tile += step


def _wgrad_kernel(
    x_ptr,  # [M, K] forward input ([T, K] through x_idx when X_GATHER)
    dy_ptr,  # [M, N] output gradient ([T, N] through dy_idx when DY_GATHER)
    dw_ptr,  # dW[g][n, k] at dw_ptr[g * stride_cg + n * stride_cn + k * stride_ck]
    m_sizes_ptr,  # [G] int
    m_starts_ptr,  # [G] int: exclusive prefix sum of m_sizes
    x_idx_ptr,  # [M] int32 (X_GATHER)
    dy_idx_ptr,  # [M] int32 (DY_GATHER)
    dy_scale_ptr,  # [M] float32: factor of each dy row (DY_SCALE)
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
    GROUP_N: tl.constexpr,
    USE_TMA: tl.constexpr,  # TMA for the operands that are not gathered
    X_GATHER: tl.constexpr,
    DY_GATHER: tl.constexpr,
    DY_SCALE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_group = num_n_tiles * num_k_tiles
    offs_m0 = tl.arange(0, BLOCK_M)
    tile = pid
    for g in range(G):
        if tile < (g + 1) * tiles_per_group:  # this program has work in group g
            m_start = tl.load(m_starts_ptr + g).to(tl.int32)
            m_end = m_start + tl.load(m_sizes_ptr + g).to(tl.int32)
            if USE_TMA:
                # Per (program, group): the row bound m_end makes TMA zero-fill the next group's rows.
                if not X_GATHER:
                    x_desc = tl.make_tensor_descriptor(
                        x_ptr, shape=[m_end, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K]
                    )
                if not DY_GATHER:
                    dy_desc = tl.make_tensor_descriptor(
                        dy_ptr, shape=[m_end, N], strides=[stride_dym, 1], block_shape=[BLOCK_M, BLOCK_N]
                    )
            while tile < (g + 1) * tiles_per_group:
                local = tile - g * tiles_per_group
                # L2-aware order: GROUP_N n-tiles walk down the k-tiles together, so programs that
                # run at the same time share a few dy column bands and x column bands.
                band_tiles = GROUP_N * num_k_tiles
                first_n = (local // band_tiles) * GROUP_N
                band_n = tl.minimum(num_n_tiles - first_n, GROUP_N)
                pid_n = first_n + (local % band_tiles) % band_n
                pid_k = (local % band_tiles) // band_n
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
                acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
                for m0 in range(m_start, m_end, BLOCK_M):
                    offs_m = m0 + offs_m0
                    m_mask = offs_m < m_end
                    if USE_TMA and not DY_GATHER:
                        dy_t = tl.trans(dy_desc.load([m0, pid_n * BLOCK_N]))  # [BLOCK_N, BLOCK_M]
                    else:
                        if DY_GATHER:
                            dy_rows = tl.load(dy_idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
                        else:
                            dy_rows = offs_m.to(tl.int64)
                        dy_t = tl.load(
                            dy_ptr + dy_rows[None, :] * stride_dym + offs_n[:, None].to(tl.int64) * stride_dyn,
                            mask=m_mask[None, :] & (offs_n[:, None] < N),
                            other=0.0,
                        )
                    if DY_SCALE:
                        row_scale = tl.load(dy_scale_ptr + offs_m, mask=m_mask, other=0.0).to(tl.float32)
                        dy_t = (dy_t.to(tl.float32) * row_scale[None, :]).to(dy_ptr.dtype.element_ty)
                    if USE_TMA and not X_GATHER:
                        xt = x_desc.load([m0, pid_k * BLOCK_K])  # [BLOCK_M, BLOCK_K]
                    else:
                        if X_GATHER:
                            x_rows = tl.load(x_idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
                        else:
                            x_rows = offs_m.to(tl.int64)
                        xt = tl.load(
                            x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                            mask=m_mask[:, None] & (offs_k[None, :] < K),
                            other=0.0,
                        )
                    if UPCAST_DOT:
                        acc = tl.dot(dy_t.to(tl.float32), xt.to(tl.float32), acc)
                    else:
                        acc = tl.dot(dy_t, xt, acc, input_precision=INPUT_PRECISION)
                c_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
                tl.store(
                    dw_ptr
                    + tl.cast(g, tl.int64) * stride_cg
                    + offs_n[:, None].to(tl.int64) * stride_cn
                    + offs_k[None, :].to(tl.int64) * stride_ck,
                    acc.to(dw_ptr.dtype.element_ty),
                    mask=c_mask,
                )
                tile += step


_FWD_KEY = ("N", "K", "G", "M_BUCKET", "USE_TMA", "B_N_CONTIGUOUS", "A_GATHER", "SCATTER", "HAS_SCALE")
_WGRAD_KEY = ("N", "K", "G", "M_BUCKET", "USE_TMA", "X_GATHER", "DY_GATHER", "DY_SCALE")
# The forward accumulates into ``out`` when SCATTER (atomics): the autotuner restores it after each
# benchmark launch. Plain launches overwrite ``out``; the restore then only costs a copy while tuning.
_FWD = LazyKernel(_grouped_gemm_kernel, _fwd_configs, _FWD_KEY, prune_fwd, restore_value=["out_ptr"])
_WGRAD = LazyKernel(_wgrad_kernel, _wgrad_configs, _WGRAD_KEY, prune_wgrad)


def _dot_flags(dtype: torch.dtype) -> dict[str, object]:
    interpret = interpreter_enabled()
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST_DOT": interpret, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """Unit inner stride, 16-byte aligned row strides and start (no data_ptr: allocations are aligned)."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or any(s * size % 16 for s in t.stride()[:-1]) or t.storage_offset() * size % 16:
            return False
    return True


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
    x: torch.Tensor,
    w: torch.Tensor,
    m_sizes: torch.Tensor,
    transposed_w: bool = False,
    *,
    a_idx: torch.Tensor | None = None,
    num_rows: int | None = None,
    out: torch.Tensor | None = None,
    scatter_idx: torch.Tensor | None = None,
    scatter_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward kernel alone (no autograd); same contract as ``reference.grouped_gemm``.

    Fused MoE variants (all index tensors int32 on the device):

    - ``a_idx`` [M]: GEMM row r reads ``x[a_idx[r]]`` (x is then [T, K]); ``num_rows`` = M.
    - ``scatter_idx`` [M] (with ``out`` [T, N] float32, zero-filled by the caller):
      ``out[scatter_idx[r]] += scatter_scale[r] * row r`` instead of storing row r.
    - ``out``: write into this [M, N] tensor (any row stride) instead of a new one.
    """
    _check(x, w, m_sizes, transposed_w)
    rows = x.shape[0] if a_idx is None else (a_idx.shape[0] if num_rows is None else num_rows)
    if transposed_w:  # w [G, K, N]
        n_out, stride_bk, stride_bn = w.shape[2], w.stride(1), w.stride(2)
    else:  # w [G, N, K]
        n_out, stride_bk, stride_bn = w.shape[1], w.stride(2), w.stride(1)
    scatter = scatter_idx is not None
    if out is None:
        if scatter:
            raise ValueError("grouped_gemm_forward: scatter_idx needs a zero-filled float32 out [T, N]")
        out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if rows == 0 or n_out == 0:
        return out
    groups, k_in = w.shape[0], x.shape[1]
    tma = use_tma(x.device) and _tma_aligned(w)
    if tma and a_idx is None:
        tma = _tma_aligned(x)
    if tma and not scatter:
        tma = _tma_aligned(out)
    if tma:
        prepare_tma()
    max_programs = num_programs(x.device)

    def grid(meta: dict[str, int]) -> tuple[int]:
        upper = (triton.cdiv(rows, meta["BLOCK_M"]) + groups) * triton.cdiv(n_out, meta["BLOCK_N"])
        return (max(1, min(max_programs, upper)),)

    blocks = {} if _FWD.autotuned else {**_INTERPRETER_BLOCKS, "GROUP_M": 2}
    dummy = m_sizes
    _FWD[grid](
        x,
        w,
        out,
        m_sizes,
        a_idx if a_idx is not None else dummy,
        scatter_idx if scatter else dummy,
        scatter_scale if scatter_scale is not None else out,
        rows,
        n_out,
        k_in,
        groups,
        triton.next_power_of_2(rows),
        x.stride(0),
        x.stride(1),
        w.stride(0),
        stride_bk,
        stride_bn,
        out.stride(0),
        out.stride(1),
        USE_TMA=tma,
        B_N_CONTIGUOUS=stride_bn == 1,
        A_GATHER=a_idx is not None,
        SCATTER=scatter,
        HAS_SCALE=scatter_scale is not None,
        **_dot_flags(x.dtype),
        **blocks,
    )
    return out


def grouped_gemm_wgrad(
    x: torch.Tensor,
    dy: torch.Tensor,
    m_sizes: torch.Tensor,
    transposed_w: bool = False,
    *,
    x_idx: torch.Tensor | None = None,
    dy_idx: torch.Tensor | None = None,
    dy_scale: torch.Tensor | None = None,
    num_rows: int | None = None,
) -> torch.Tensor:
    """dW of :func:`grouped_gemm`: [G, N, K] (or [G, K, N] if ``transposed_w``); zero for empty groups.

    ``x``: [M, K] forward input, ``dy``: [M, N] output gradient. float32 accumulation, result in
    ``x.dtype``. Fused MoE variants: row r of the problem reads ``x[x_idx[r]]`` and
    ``dy_scale[r] * dy[dy_idx[r]]`` (each optional); ``num_rows`` is then M.
    """
    groups = m_sizes.shape[0]
    n_out, k_in = dy.shape[1], x.shape[1]
    shape = (groups, k_in, n_out) if transposed_w else (groups, n_out, k_in)
    dw = torch.empty(shape, dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    rows = num_rows if num_rows is not None else (x.shape[0] if x_idx is None else dy.shape[0])
    m_starts = torch.cumsum(m_sizes, 0, dtype=torch.int32) - m_sizes.to(torch.int32)
    stride_cn, stride_ck = (dw.stride(2), dw.stride(1)) if transposed_w else (dw.stride(1), dw.stride(2))
    plain = [t for t, idx in ((x, x_idx), (dy, dy_idx)) if idx is None]
    tma = use_tma(x.device) and bool(plain) and _tma_aligned(*plain)
    if tma:
        prepare_tma()
    max_programs = num_programs(x.device)

    def grid(meta: dict[str, int]) -> tuple[int]:
        tiles = groups * triton.cdiv(n_out, meta["BLOCK_N"]) * triton.cdiv(k_in, meta["BLOCK_K"])
        return (max(1, min(max_programs, tiles)),)

    dummy = m_sizes
    _WGRAD[grid](
        x,
        dy,
        dw,
        m_sizes,
        m_starts,
        x_idx if x_idx is not None else dummy,
        dy_idx if dy_idx is not None else dummy,
        dy_scale if dy_scale is not None else dw,
        n_out,
        k_in,
        groups,
        triton.next_power_of_2(max(rows, 1)),
        x.stride(0),
        x.stride(1),
        dy.stride(0),
        dy.stride(1),
        dw.stride(0),
        stride_cn,
        stride_ck,
        USE_TMA=tma,
        X_GATHER=x_idx is not None,
        DY_GATHER=dy_idx is not None,
        DY_SCALE=dy_scale is not None,
        **_dot_flags(x.dtype),
        **({} if _WGRAD.autotuned else {**_INTERPRETER_BLOCKS, "GROUP_N": 2}),
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

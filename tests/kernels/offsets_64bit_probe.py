"""Run by test_offsets_64bit.py in a fresh process (TRITON_INTERPRET=1): grouped GEMM cases whose
element offsets pass 2**31, built from small tiles and huge strides over lazily-committed buffers.

``torch.empty`` of a few GiB only reserves address space: the pages the strided views touch
(a few rows) are all that gets committed, so this runs on a laptop. Each case prints
``OK name`` or raises; an offset computed in int32 wraps negative and reads before the buffer
(wrong numbers or a crash, either way the parent test fails).
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROW = 1 << 30  # row stride in elements: row 2 starts at element 2**31


def _module():
    if len(sys.argv) > 1 and sys.argv[1] != "current":  # a file path: check another version (used by hand)
        import importlib.util

        spec = importlib.util.spec_from_file_location("gg_under_test", sys.argv[1])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    from posttrain.kernels import grouped_gemm

    return grouped_gemm


def _rows(dtype: torch.dtype, num_rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """[num_rows, cols] view with row stride 2**30 elements, rows filled with random values."""
    base = torch.empty((num_rows - 1) * ROW + cols, dtype=dtype)
    view = base.as_strided((num_rows, cols), (ROW, 1))
    view.copy_(torch.randn(num_rows, cols, generator=gen))
    return view


def main() -> None:
    gg = _module()
    gen = torch.Generator().manual_seed(0)
    k_in, n_out = 24, 40
    sizes = torch.tensor([1, 0, 2], dtype=torch.int32)

    # 1. activations: row 2 of x starts at element 2**31 (row x stride)
    x = _rows(torch.float32, 3, k_in, gen)
    w = torch.randn(3, n_out, k_in, generator=gen)
    got = gg.grouped_gemm_forward(x, w, sizes)
    want = torch.cat([x[:1] @ w[0].T, x[1:] @ w[2].T])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("OK x_rows")

    # 2. weights: expert 2 starts at element 2**31 (group x stride)
    base = torch.empty(2 * ROW + n_out * k_in)
    w_big = base.as_strided((3, n_out, k_in), (ROW, k_in, 1))
    w_big.copy_(torch.randn(3, n_out, k_in, generator=gen))
    x_small = torch.randn(3, k_in, generator=gen)
    got = gg.grouped_gemm_forward(x_small, w_big, sizes)
    want = torch.cat([x_small[:1] @ w_big[0].T, x_small[1:] @ w_big[2].T])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("OK w_groups")
    del base, w_big

    # 3. output: row 2 of out starts at element 2**31 (store offsets)
    if "out" in gg.grouped_gemm_forward.__code__.co_varnames:
        out = _rows(torch.float32, 3, n_out, gen)
        gg.grouped_gemm_forward(x_small, w, sizes, out=out)
        want = torch.cat([x_small[:1] @ w[0].T, x_small[1:] @ w[2].T])
        torch.testing.assert_close(out.clone(), want, rtol=1e-5, atol=1e-5)
        print("OK out_rows")

        # 4. fused: gathered A rows (token 2 at 2**31) and scatter-add into out rows past 2**31
        tokens = _rows(torch.float32, 3, k_in, gen)
        idx = torch.tensor([2, 0, 2], dtype=torch.int32)  # GEMM row -> token
        scale = torch.tensor([0.5, 2.0, -1.0])
        combined = _rows(torch.float32, 3, n_out, gen)
        combined.zero_()
        gg.grouped_gemm_forward(
            tokens, w, sizes, a_idx=idx, num_rows=3, out=combined, scatter_idx=idx, scatter_scale=scale
        )
        rows = tokens[idx.long()]
        y = torch.cat([rows[:1] @ w[0].T, rows[1:] @ w[2].T]) * scale[:, None]
        want = torch.zeros(3, n_out).index_add_(0, idx.long(), y)
        torch.testing.assert_close(combined.clone(), want, rtol=1e-5, atol=1e-5)
        print("OK gather_scatter")

    # 5. dW: x and dy rows past 2**31
    dy = _rows(torch.float32, 3, n_out, gen)
    dw = gg.grouped_gemm_wgrad(x, dy, sizes)
    want = torch.stack([dy[:1].T @ x[:1], torch.zeros(n_out, k_in), dy[1:].T @ x[1:]])
    torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-5)
    print("OK wgrad_rows")


if __name__ == "__main__":
    main()

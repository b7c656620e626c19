"""LoRA dropout's mask D in the kernels: drawn once with Philox, kept as one bit per element.

The LoRA forward's F1 draws D (``dropout_scale``) and writes its bits (``pack_kept``); B2
and B3 read them back (``dropout_kept``). Redrawing D with Philox in B2 made it spill and
run 5.7x the SASS of B2 without dropout; the bits cost ~2 instructions per element
(benchmarks/results/kernel_resources.md).
"""
import triton
import triton.language as tl


@triton.jit
def dropout_scale(seed, rows, cols, n_cols, P: tl.constexpr):
    """[rows, cols] block of D: 1/(1-p) where kept, 0 where dropped.

    Element (m, k) always draws Philox counter m·n_cols + k (mod 2^32), so the
    forward and both backward kernels regenerate the same mask.
    """
    offsets = (rows[:, None] * n_cols + cols[None, :]).to(tl.uint32)
    keep = tl.rand(seed, offsets) >= P
    return tl.where(keep, 1.0 / (1.0 - P), 0.0)


@triton.jit
def dropout_kept(mask_ptr, rows, cols, M, n_cols):
    """D's keep bits for a [rows, cols] block, read back: True where kept.

    Bit k % 32 of int32 word (m, k // 32) of the mask [M, ceil(n_cols/32)] is element (m, k).
    cols must be contiguous from a multiple of 32, spanning a multiple of 32: each word is
    loaded once and expanded in registers (~2 instructions per element; a load per element
    cost ~6). The first column is taken as tl.min(cols): with pid·BLOCK instead, sm_90
    builds of B2 came out ~10% longer (another layout for the words).
    """
    n_words = tl.cdiv(n_cols, 32)
    word_cols = tl.min(cols.to(tl.int32)) // 32 + tl.arange(0, cols.shape[0] // 32)
    words = tl.load(mask_ptr + (rows.to(tl.int32)[:, None] * n_words + word_cols[None, :]),
                    mask=(rows[:, None] < M) & (word_cols[None, :] < n_words), other=0)
    bits = words[:, :, None] & (1 << tl.arange(0, 32))[None, None, :]
    return tl.reshape(bits, (rows.shape[0], cols.shape[0])) != 0


@triton.jit
def pack_kept(scale):
    """The packed bits of a [BLOCK_M, BLOCK_K] block of D (BLOCK_K a multiple of 32):
    [BLOCK_M, BLOCK_K / 32] int32 words, bit b of word j for column 32·j + b."""
    BLOCK_M: tl.constexpr = scale.shape[0]
    BLOCK_K: tl.constexpr = scale.shape[1]
    bits = tl.reshape((scale != 0).to(tl.uint32), (BLOCK_M, BLOCK_K // 32, 32))
    words = tl.sum(bits << tl.arange(0, 32).to(tl.uint32)[None, None, :], axis=2)
    return words.to(tl.int32, bitcast=True)

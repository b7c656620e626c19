"""NF4: quantisation against the paper's per-element rule, round-trip error bound, packing, memory,
and the Triton dequantisation against the eager reference bit for bit."""
import pytest
import torch

from lorakernels.nf4 import (ABSMAX_BLOCK_SIZE, BLOCK_SIZE, NF4_CODE_VALUES, NF4_MAX_GAP,
                             NF4Weight, dequantize_absmax_reference, dequantize_nf4_reference,
                             nf4_nbytes, quantize_nf4)
from lorakernels.ops.nf4_dequant import dequantize_nf4

# 384 blocks (two absmax groups), 96, 40 (a partial program)
SHAPES = [(128, 192), (96, 64), (40, 64)]


def _weight(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w.view(-1)[:BLOCK_SIZE] = 0.0  # an all-zero block
    w.view(-1)[BLOCK_SIZE:2 * BLOCK_SIZE] *= 50  # an outlier block widens the absmax range
    return w.to(dtype)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """Indices in element order, byte by byte: the high nibble is the earlier element."""
    out = []
    for byte in packed.tolist():
        out += [byte // 16, byte % 16]
    return torch.tensor(out)


def _paper_indices(weight: torch.Tensor) -> torch.Tensor:
    """QLoRA's rule written out: each element / its block's absmax, then the nearest code value."""
    flat = weight.reshape(-1).float()
    code = torch.tensor(NF4_CODE_VALUES, dtype=torch.float64)
    indices = torch.empty(flat.numel(), dtype=torch.long)
    for start in range(0, flat.numel(), BLOCK_SIZE):
        block = flat[start:start + BLOCK_SIZE]
        absmax = block.abs().max()
        normalized = block / absmax if absmax > 0 else torch.zeros_like(block)
        distance = (normalized.double()[:, None] - code[None, :]).abs()
        indices[start:start + BLOCK_SIZE] = distance.argmin(dim=1)
    return indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_the_papers_per_element_rule(shape, dtype):
    w = _weight(shape, dtype)
    q = quantize_nf4(w)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (w.numel() // 2,)
    assert q.absmax_q.dtype == torch.int8 and q.absmax_q.shape == (w.numel() // BLOCK_SIZE,)
    assert q.absmax_scale.shape == (-(-q.n_blocks // ABSMAX_BLOCK_SIZE),)
    assert q.shape == shape and q.dtype == dtype
    assert torch.equal(_unpack(q.packed), _paper_indices(w))


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_error_within_the_nf4_bound(shape):
    w = _weight(shape)
    q = quantize_nf4(w)
    absmax = w.reshape(-1, BLOCK_SIZE).abs().amax(dim=1)
    stored = dequantize_absmax_reference(q)
    # Double quantisation: symmetric int8 per 256 blocks, off by at most half a step.
    group = torch.arange(q.n_blocks) // ABSMAX_BLOCK_SIZE
    spread = torch.zeros(q.absmax_scale.numel()).scatter_reduce(
        0, group, (absmax - q.absmax_offset).abs(), "amax")
    absmax_bound = spread[group] / 254 * (1 + 1e-5) + 1e-7 * absmax
    assert ((stored - absmax).abs() <= absmax_bound).all()

    restored = dequantize_nf4_reference(q, torch.float32).reshape(-1, BLOCK_SIZE)
    error = (restored - w.reshape(-1, BLOCK_SIZE)).abs()
    bound = NF4_MAX_GAP / 2 * absmax * (1 + 1e-6) + absmax_bound
    assert (error <= bound[:, None]).all()
    assert torch.equal(dequantize_nf4_reference(q, torch.float32).view(-1)[:BLOCK_SIZE],
                       torch.zeros(BLOCK_SIZE))  # the zero block stays zero
    # The bound is not vacuous: the typical error is far below it.
    assert error.mean() < 0.25 * bound.mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_dequant_equals_reference_bit_for_bit(shape, dtype):
    q = quantize_nf4(_weight(shape, seed=1))
    expected = dequantize_nf4_reference(q, dtype)
    got = dequantize_nf4(q, dtype=dtype)
    assert got.dtype == dtype and got.shape == shape
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # bit for bit, -0.0 included
    assert torch.equal(got.view(-1).view(bits), expected.view(-1).view(bits))


def test_triton_dequant_writes_into_the_given_buffer():
    q = quantize_nf4(_weight((96, 64), seed=2))
    out = torch.full((96, 64), float("nan"), dtype=torch.bfloat16)
    assert dequantize_nf4(q, out=out) is out
    assert torch.equal(out, dequantize_nf4_reference(q, torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        dequantize_nf4(q, out=torch.empty(64, 96, dtype=torch.bfloat16))


def test_packing_puts_the_first_element_in_the_high_nibble():
    w = torch.zeros(2 * BLOCK_SIZE)
    w[0], w[1], w[2] = 1.0, -1.0, 0.6  # codes 15, 0, nearest to 0.6 is 0.5626170 (13)
    w[BLOCK_SIZE + 1] = -2.0           # second block: code 7 (zero) then 0 (-1.0)
    q = quantize_nf4(w)
    assert q.packed[0].item() == 0xF0
    assert q.packed[1].item() == 0xD7
    assert q.packed[BLOCK_SIZE // 2].item() == 0x70
    assert (q.packed[2:BLOCK_SIZE // 2] == 0x77).all()


@pytest.mark.parametrize("shape", [(100,), (3, 7), (0, 64), (63, 1)])
def test_sizes_not_a_multiple_of_the_block_are_refused(shape):
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_nf4(torch.randn(shape))


def test_memory_is_about_half_a_byte_per_weight():
    q = quantize_nf4(torch.randn(1024, 1024, dtype=torch.bfloat16))
    assert isinstance(q, NF4Weight) and q.nbytes == nf4_nbytes(1024 * 1024)
    assert q.nbytes < 0.52 * 1024 * 1024
    numel = 4096 * 4096  # 0.5 + 1/64 (int8 absmax) + 4/(64·256) (scales) bytes a weight
    assert 0.5 * numel < nf4_nbytes(numel) < 0.52 * numel

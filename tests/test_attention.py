"""lorakernels.attention: the plan per batch, the re-batched conversations path and FlexAttention,
each against SDPA under the dense mask (reference.attention_mask)."""
import pytest
import torch
import torch.nn.functional as F

from lorakernels import settings
from lorakernels.attention import attention, attention_plan
from lorakernels.ops.conversation_attention import conversation_attention, conversation_batch
from lorakernels.ops.flex_attention import computed_fraction, packed_block_mask, packed_mask_mod
from lorakernels.reference import attention_mask, attention_reference
from conftest import use_settings

CPU = torch.device("cpu")
# Two rows: three conversations; two and padding (segment -1, as training.data.collate pads).
SEGMENTS = torch.tensor([[0] * 10 + [1] * 17 + [2] * 13,
                         [0] * 25 + [1] * 5 + [-1] * 10])


def qkv(B, Hq, Hk, T, D, dtype=torch.float32, device=CPU, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=gen, device=device).to(dtype).requires_grad_()
            for H in (Hq, Hk, Hk)]


def mask_from_mod(mask_mod, B, T):
    """mask_mod evaluated at every (b, q, k): [B, T, T] bool."""
    b = torch.arange(B)[:, None, None]
    q, k = torch.arange(T)[None, :, None], torch.arange(T)[None, None, :]
    return mask_mod(b, 0, q, k).expand(B, T, T)


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("choice", ["auto", "sdpa"])
def test_plan_on_cpu_takes_sdpa(monkeypatch, choice):
    use_settings(monkeypatch, attention=choice)
    assert attention_plan(SEGMENTS, 40, 40, 2047, CPU).kind == "conversations"
    assert attention_plan(None, 40, 40, 2047, CPU).kind == "causal"
    assert attention_plan(None, 40, 40, None, CPU).kind == "causal"
    windowed = attention_plan(None, 40, 40, 8, CPU)  # one sequence longer than the window
    assert windowed.kind == "windowed" and windowed.mask is None and windowed.window == 8
    assert attention_plan(None, 1, 40, 2047, CPU, cached=True).kind == "causal"  # generation
    assert attention_plan(None, 3, 40, 8, CPU, cached=True).kind == "masked"


def test_auto_takes_flex_on_cuda_when_a_mask_is_needed(monkeypatch):
    import lorakernels.ops.flex_attention as flex

    monkeypatch.setattr(flex, "packed_block_mask", lambda *args: "block mask")
    use_settings(monkeypatch, attention="auto")
    cuda = torch.device("cuda")
    assert attention_plan(SEGMENTS, 40, 40, 2047, cuda).kind == "flex"  # packing
    assert attention_plan(None, 40, 40, 8, cuda).kind == "flex"  # window < T
    assert attention_plan(None, 40, 40, 2047, cuda).kind == "causal"  # flash SDPA does it
    assert attention_plan(None, 1, 40, 2047, cuda, cached=True).kind == "causal"  # KV cache: SDPA
    use_settings(monkeypatch, attention="sdpa")
    assert attention_plan(SEGMENTS, 40, 40, 2047, cuda).kind == "conversations"
    use_settings(monkeypatch, attention="flex")
    assert attention_plan(None, 40, 40, None, CPU).kind == "flex"  # forced: every uncached forward
    assert attention_plan(None, 1, 40, None, CPU, cached=True).kind == "causal"


# ----------------------------------------------------------------------------- conversations


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [None, 8, 17, 2047], ids=lambda w: f"window{w}")
def test_conversations_equal_masked_sdpa_forward_and_backward(heads, window):
    Hq, Hk = heads
    q, k, v = qkv(2, Hq, Hk, 40, 16)
    dy = torch.randn(2, Hq, 40, 16)
    expected = attention_reference(q, k, v, attention_mask(40, 40, SEGMENTS, window, CPU))
    expected_grads = torch.autograd.grad(expected, (q, k, v), dy)
    got = conversation_attention(q, k, v, conversation_batch(SEGMENTS, window))
    grads = torch.autograd.grad(got, (q, k, v), dy)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_conversation_layout():
    layout = conversation_batch(SEGMENTS, sliding_window=2047)
    # Row 0: 10, 17, 13; row 1: 25, 5 and the padding (10): six conversations of up to 25.
    assert (layout.conversations, layout.longest) == (6, 25)
    assert layout.window is None and not layout.one_per_row
    assert layout.gather.view(6, 25)[0].tolist() == list(range(10)) + [9] * 15
    assert layout.scatter.numel() == 80 and layout.scatter[:11].tolist() == list(range(10)) + [25]
    assert conversation_batch(SEGMENTS, sliding_window=8).window == 8
    assert conversation_batch(torch.zeros(2, 40), sliding_window=8).one_per_row


def test_a_segment_id_repeated_in_the_next_row_is_a_new_conversation():
    segments = torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2]])
    q, k, v = qkv(2, 2, 2, 4, 8)
    expected = attention_reference(q, k, v, attention_mask(4, 4, segments, None, CPU))
    torch.testing.assert_close(conversation_attention(q, k, v, conversation_batch(segments, None)),
                               expected)


# ----------------------------------------------------------------------------- mask_mod, block mask


def test_mask_mod_by_hand():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1]])
    visible = mask_from_mod(packed_mask_mod(segments, sliding_window=2), 1, 6)[0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 1, 1, 0, 0, 0],  # q - k = 2 is outside a window of 2
                             [0, 0, 0, 1, 0, 0],  # a new conversation sees nothing before it
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]],  # padding sees only padding
                            dtype=torch.bool)
    assert torch.equal(visible, expected)


@pytest.mark.parametrize("window", [None, 1, 8, 17, 40], ids=lambda w: f"window{w}")
def test_mask_mod_equals_the_dense_mask(window):
    visible = mask_from_mod(packed_mask_mod(SEGMENTS, window), 2, 40)
    assert torch.equal(visible, attention_mask(40, 40, SEGMENTS, window, CPU)[:, 0])
    no_segments = mask_from_mod(packed_mask_mod(None, window), 1, 40)
    dense = attention_mask(40, 40, None, window, CPU)
    assert torch.equal(no_segments, torch.ones(1, 40, 40, dtype=torch.bool).tril()
                       if dense is None else dense[:, 0])


def test_block_mask_skips_tiles_across_conversations():
    causal = packed_block_mask(None, 256, None, CPU)  # 2 × 2 tiles of 128: 3 computed
    assert computed_fraction(causal) == pytest.approx(3 / 4)
    two = packed_block_mask(torch.tensor([[0] * 128 + [1] * 128]), 256, None, CPU)
    assert computed_fraction(two) == pytest.approx(2 / 4)
    windowed = packed_block_mask(None, 512, 128, CPU)  # the diagonal and the one below it
    assert computed_fraction(windowed) == pytest.approx(7 / 16)


# ----------------------------------------------------------------------------- FlexAttention


def test_flex_on_cpu_refuses_backward(monkeypatch):
    use_settings(monkeypatch, attention="flex")
    q, k, v = qkv(1, 2, 2, 16, 8)
    plan = attention_plan(None, 16, 16, None, CPU)
    with pytest.raises(RuntimeError, match="forward only"):
        attention(q, k, v, plan)
    with torch.no_grad():  # leaves that require grad, under no_grad: the forward runs
        torch.testing.assert_close(attention(q, k, v, plan), attention_reference(q, k, v, None))


def test_flex_forward_on_cpu_equals_masked_sdpa_and_does_not_recompile(monkeypatch):
    """Compiled on CPU (forward only): GQA, a window shorter than a conversation, padding;
    a second batch of other segments reuses the compiled kernel."""
    use_settings(monkeypatch, attention="flex")
    T, window = 200, 12
    second = torch.tensor([[0] * 90 + [1] * 100 + [-1] * 10, [0] * 200])
    segments = torch.cat([SEGMENTS, torch.full((2, T - 40), -1)], dim=1)
    q, k, v = (t.detach() for t in qkv(2, 4, 2, T, 16))
    with torch.no_grad():
        for index, batch in enumerate((segments, second)):
            expected = attention_reference(q, k, v, attention_mask(T, T, batch, window, CPU))
            plan = attention_plan(batch, T, T, window, CPU)
            assert plan.kind == "flex"
            with torch._dynamo.config.patch(error_on_recompile=index > 0):
                got = attention(q, k, v, plan)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
@pytest.mark.parametrize("heads", [(32, 32, 96), (40, 10, 128)], ids=["phi3-mini", "phi3-medium"])
def test_flex_forward_and_backward_on_cuda_at_2048(monkeypatch, heads):
    """bf16, T 2048, example-like conversations of 20-90 tokens and the 2047 window: equal to masked
    SDPA (both against fp32), and no [B, H, T, T] tensor (peak well under B·H·T²·2 bytes)."""
    use_settings(monkeypatch, attention="flex")
    Hq, Hk, D = heads
    B, T, window, cuda = 2, 2048, 2047, torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 90, (B, T), generator=gen)
    segments = torch.stack([torch.repeat_interleave(torch.arange(T), row)[:T]
                            for row in lengths]).to(cuda)
    q, k, v = qkv(B, Hq, Hk, T, D, torch.bfloat16, cuda)
    dy = torch.randn(B, Hq, T, D, device=cuda, dtype=torch.bfloat16)
    mask = attention_mask(T, T, segments, window, cuda)
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    exact = attention_reference(*fp32, mask)
    exact_grads = torch.autograd.grad(exact, fp32, dy.float())
    plan = attention_plan(segments, T, T, window, cuda)
    assert plan.kind == "flex"
    attention(q, k, v, plan).backward(dy)  # compile outside the measured peak
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = attention(q, k, v, plan)
    got.backward(dy)
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < B * Hq * T * T * 2 / 4
    for ours, exact_value in [(got, exact)] + list(zip((q.grad, k.grad, v.grad), exact_grads)):
        error = (ours.float() - exact_value).abs().max() / exact_value.abs().max()
        assert error < 2e-2


def test_packed_flex_forward_equals_transformers_conversation_by_conversation(monkeypatch,
                                                                             tmp_path):
    """attention flex on CPU: the packed forward runs no SDPA, and each conversation's
    logits equal transformers' on that conversation alone (GQA, a window of 8 shorter than every
    conversation, LongRoPE's long factors: every conversation is past the original 16 positions)."""
    from test_phi3_model import LONGROPE, hf_model

    from model import Phi3ForCausalLM

    reference = hf_model(dict(LONGROPE, num_key_value_heads=2, sliding_window=8), tmp_path)
    ours = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    lengths = [20, 17, 23]
    torch.manual_seed(1)
    chats = [torch.randint(0, 96, (n,)) for n in lengths]
    pad = 64 - sum(lengths)
    packed = torch.cat(chats + [torch.full((pad,), 2)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths]
                          + [torch.zeros(pad, dtype=torch.long)])[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]
                         + [torch.full((pad,), -1)])[None]
    use_settings(monkeypatch, attention="flex")

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA ran under attention flex")

    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", no_sdpa)
        logits = ours(packed, position_ids=positions, segment_ids=segments)
    start = 0
    with torch.no_grad():
        for chat in chats:
            expected = reference(chat[None]).logits
            torch.testing.assert_close(logits[:, start:start + len(chat)], expected,
                                       rtol=1e-4, atol=1e-4)
            start += len(chat)


# ------------------------------------------------------------------------- train.py's --attention


def test_attention_flag(monkeypatch, tmp_path):
    from training.config import TrainConfig, check_environment, parse_config
    from training.loop import train

    assert parse_config(["--attention", "sdpa"]).attention == "sdpa"
    assert parse_config([]).attention is None
    with pytest.raises(ValueError,
                       match="--attention must be one of auto, flex, sdpa, got 'flash'"):
        TrainConfig(attention="flash")
    with pytest.raises(ValueError, match="--attention flex trains on CUDA only"):
        check_environment(TrainConfig(attention="flex", device="cpu"))
    seen = []
    monkeypatch.setattr("training.loop._train", lambda *args: seen.append(settings.current()))
    for flag in ("sdpa", None):
        train(TrainConfig(attention=flag, output=str(tmp_path / str(flag))))
    assert [s.attention for s in seen] == ["sdpa", "auto"]
    assert settings.current().attention == "auto"  # the run's choice ends with it


# ----------------------------------------------------------------------------- long sequences


def windowed_cases():
    """Lengths crossing the window several times, packed (conversations of several window
    lengths beside short ones) and one sequence per row; fp32 and bf16."""
    for window in (8, 130):
        T = 5 * max(window, 128) + 37
        packed = torch.tensor([[0] * (T - 50) + [1] * 50, [0] * 20 + [1] * (T - 30) + [-1] * 10])
        for segments in (packed, None):
            for dtype in (torch.float32, torch.bfloat16):
                yield pytest.param(window, T, segments, dtype, id=f"w{window}-T{T}-"
                                   f"{'packed' if segments is not None else 'rows'}-"
                                   f"{str(dtype)[6:]}")


# bf16: both paths round the same fp32 softmax sums once to bf16 (relative step 2^-8); the
# blocks only reorder the keys' sums, so they stay within a few bf16 steps of the fp32 truth.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("window, T, segments, dtype", windowed_cases())
def test_long_rows_run_in_blocks_equal_to_the_masked_reference(window, T, segments, dtype):
    q, k, v = qkv(2, 4, 2, T, 16, dtype=dtype)
    dy = torch.randn(2, 4, T, 16).to(dtype)
    reference_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = attention_reference(*reference_inputs, attention_mask(T, T, segments, window, CPU))
    expected_grads = torch.autograd.grad(expected, reference_inputs, dy.float())
    plan = attention_plan(segments, T, T, window, CPU)
    assert plan.mask is None and plan.kind == ("windowed" if segments is None else "conversations")
    got = attention(q, k, v, plan)
    grads = torch.autograd.grad(got, (q, k, v), dy)
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.float(), e, **TOLERANCE[dtype])


def test_windowed_blocks_hold_one_window_of_keys():
    """No block's mask is wider than its queries plus the window, at any length."""
    from lorakernels.ops.conversation_attention import query_blocks

    shapes = {tuple(mask.shape) for _, _, mask in query_blocks(131072, 2047)}
    assert max(q * k for q, k in shapes) == 511 * (511 + 2046)
    blocks = list(query_blocks(1000, 600))
    assert [(b.start, b.stop, k.start, k.stop) for b, k, _ in blocks] == [
        (0, 150, 0, 150), (150, 300, 0, 300), (300, 450, 0, 450), (450, 600, 0, 600),
        (600, 750, 1, 750), (750, 900, 151, 900), (900, 1000, 301, 1000)]
    for queries, keys, mask in blocks:
        distance = (torch.arange(queries.start, queries.stop)[:, None]
                    - torch.arange(keys.start, keys.stop)[None, :])
        assert torch.equal(mask, (distance >= 0) & (distance < 600))


def dense_blocks(block_mask):
    """(partial, full) [B, Qb, KVb] bool: which tiles a BlockMask lists."""
    B, _, rows = block_mask.kv_num_blocks.shape
    cols = torch.arange(block_mask.kv_indices.shape[-1])

    def tiles(count, indices):
        listed = (cols < count[:, 0, :, None]).long()
        return torch.zeros(B, rows, cols.numel(), dtype=torch.long).scatter_add_(
            -1, indices[:, 0].long(), listed) > 0

    return (tiles(block_mask.kv_num_blocks, block_mask.kv_indices),
            tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))


@pytest.mark.parametrize("T, window, packed", [
    (256, None, False), (300, None, False), (1000, 100, False), (1000, 300, True),
    (777, 2047, True), (640, 128, True)])
def test_block_mask_equals_create_block_mask(T, window, packed):
    """Built from each query block's first visible key, equal to torch's T²-point evaluation."""
    from torch.nn.attention.flex_attention import create_block_mask

    segments = torch.tensor([[0] * 100 + [1] * (T - 250) + [2] * 150,
                             [0] * (T - 5) + [-1] * 5]) if packed else None
    effective = None if window is None or window >= T else window
    expected = create_block_mask(packed_mask_mod(segments, effective),
                                 1 if segments is None else 2, None, T, T, device=CPU)
    got = packed_block_mask(segments, T, window, CPU)
    for g, e in zip(dense_blocks(got), dense_blocks(expected)):
        assert torch.equal(g, e)
    assert torch.equal(got.q_num_blocks, expected.q_num_blocks)


def test_block_mask_at_131072_tokens_is_megabytes():
    """create_block_mask would evaluate 131,072² points (17 GB as bool); ours holds
    (T / 128)² block indices."""
    from lorakernels.memory_count import LiveBytes

    T = 131072
    with LiveBytes() as count:
        block_mask = packed_block_mask(torch.zeros(1, T, dtype=torch.long), T, 2047, CPU)
    assert count.peak_bytes < 64e6
    assert computed_fraction(block_mask) < 0.02  # 17 of 1024 key blocks per query block

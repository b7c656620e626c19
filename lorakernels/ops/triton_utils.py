"""What every kernel launcher shares: interpreter detection, dot precision, autotune pruning."""
import contextlib
import os

import torch
import triton
import triton.language as tl

from ..settings import autotune_from_environment

# Triton picks interpreter or compiler when a kernel is decorated, so this is fixed at import.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (e.g. cuda:1).

    Only the forward needs it; autograd runs a CUDA backward on its tensors' device.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for fp32 ``tl.dot``s: TF32 only where torch would use it too."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def next_block(n: int, minimum: int = 16) -> int:
    """A power-of-two block covering n, at least ``minimum`` (``tl.dot`` needs 16)."""
    return max(minimum, triton.next_power_of_2(n))


def m_bucket(m: int) -> int:
    """Autotune per power-of-two bucket of tokens, not per exact batch size."""
    return triton.next_power_of_2(m)


def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on this device."""
    if device.type != "cuda":
        return 1 << 30
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return props["max_shared_mem"]


# Autotuning tries every config per key: a few per kernel role keep a first step (and a
# GPU test run) to seconds of compiling. LORAKERNELS_AUTOTUNE=0 pins each role's default.
MAX_CONFIGS = 4
AUTOTUNE = autotune_from_environment()


def autotune_configs(full, default, interpreted):
    """A role's configs: ``full`` in order of preference (at most MAX_CONFIGS fitting a
    device), ``[default]`` with LORAKERNELS_AUTOTUNE=0, ``interpreted`` (one small config:
    the interpreter runs every config it is given) without a GPU. Read at import."""
    if INTERPRETING:
        return interpreted
    return full if AUTOTUNE else [default]


def pinned_config(default, interpreted):
    """The one config a role runs with where a result must not depend on which config won
    a timing (torch's deterministic mode): the default, or the interpreter's."""
    return interpreted[0] if INTERPRETING else default


def num_warps_for(block: int) -> int:
    """Warps for a tile of ``block`` elements (Liger's calculate_settings rule)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    """fp32 x rounded to the nearest ``dtype`` value (ties to even), returned as fp32.

    Triton's interpreter converts fp32 to bf16 by truncation, so under it
    (EMULATE_BF16_RTNE) bf16 rounding is done on the bits; compiled code uses the
    hardware's round-to-nearest-even conversion, which gives the same values.
    """
    if EMULATE_BF16_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def cast_to(x, dtype: tl.constexpr, EMULATE_BF16_RTNE: tl.constexpr):
    """fp32 x converted to ``dtype`` with round-to-nearest-even, interpreted or compiled."""
    if EMULATE_BF16_RTNE and dtype == tl.bfloat16:
        return round_to(x, dtype, EMULATE_BF16_RTNE).to(dtype)  # exact: already a bf16 value
    else:
        return x.to(dtype)

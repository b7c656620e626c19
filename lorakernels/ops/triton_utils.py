"""What every kernel launcher shares: interpreter detection, dot precision, autotune pruning."""
import os

import torch
import triton

# Triton picks interpreter or compiler when a kernel is decorated, so this is fixed at import.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for fp32 ``tl.dot``s: TF32 only where torch would use it too."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def next_block(n: int, minimum: int = 16) -> int:
    """A power-of-two block covering n, at least ``minimum`` (``tl.dot`` needs 16)."""
    return max(minimum, triton.next_power_of_2(n))


def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on this device."""
    if device.type != "cuda":
        return 1 << 30
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return props["max_shared_mem"]


def autotune_configs(full, interpreted):
    """The interpreter runs every config it is given, so it gets one small one."""
    return interpreted if INTERPRETING else full

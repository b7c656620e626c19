"""What a compiled kernel costs, read from its cubin with the cuobjdump Triton ships.

Registers, stack (local memory: spills), shared memory, SASS instruction count, the
tensor-core instruction kind (HGMMA on Hopper's wgmma path, HMMA on mma.sync), atomics
and fences: the readings that tell, without a GPU, whether a kernel would lose on one.
"""
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# One SASS instruction: its address, an optional predicate, the opcode.
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+)", re.M)
ATOMICS = ("ATOM", "ATOMG", "ATOMS", "RED", "REDG")
# GPU- and system-scope fences and cache invalidations: what acq_rel atomics cost. The
# CTA-scope MEMBAR and FENCE.VIEW.ASYNC before a wgmma (its proxy fence) are not counted.
_FENCE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?"
                    r"(?:MEMBAR\.[A-Z.]*(?:GPU|SYS)|CCTL|ERRBAR)\b", re.M)


def opcode_counts(sass: str) -> collections.Counter:
    """Opcodes (without modifiers) of a SASS listing, NOPs left out."""
    counts = collections.Counter(_INSTRUCTION.findall(sass))
    counts.pop("NOP", None)
    return counts


def cubin_resources(cubin: bytes, dynamic_shared: int) -> dict:
    """Registers, spills, shared memory and the instruction mix of one compiled kernel.

    ``dynamic_shared`` is Triton's metadata.shared (the pipeline buffers); the cubin
    itself reports only static shared memory (mbarriers): a program needs both.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", path],
                              capture_output=True, text=True, check=True).stdout
    regs, stack, static, local = map(int, _USAGE.search(usage).groups())
    ops = opcode_counts(sass)
    tensor_core = "/".join(kind for kind in ("HGMMA", "HMMA") if ops[kind]) or "none"
    return dict(
        registers=regs, stack_bytes=stack + local, shared=dynamic_shared + static,
        dynamic_shared=dynamic_shared,
        sass=sum(ops.values()), spill_stores=ops["STL"], spill_loads=ops["LDL"],
        tensor_core=tensor_core, mma=ops["HGMMA"] + ops["HMMA"],
        atomics=sum(ops[op] for op in ATOMICS), fences=len(_FENCE.findall(sass)),
    )

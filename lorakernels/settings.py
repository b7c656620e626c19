"""What a user may choose about how the ops run, in one object.

``Settings`` holds the choices: the backend (Triton kernels, the oneDNN CPU path or the
eager reference), the attention (FlexAttention or SDPA), the LoRA GEMM path (fused Triton
GEMM or cuBLAS + epilogue) and whose device's code path runs. ``current()`` is what the ops
read; ``override(...)`` changes it for a ``with`` block, in the style of
``torch.nn.attention.sdpa_kernel``:

    with lorakernels.settings.override(backend="eager", attention="sdpa"):
        loss = model(...)

The environment supplies the defaults, read once by ``from_environment``:
``LORAKERNELS_BACKEND``, ``LORAKERNELS_ATTENTION``, ``LORAKERNELS_GEMM`` and
``LORAKERNELS_AUTOTUNE`` (the last picks the kernels' autotune config lists when they are
decorated, so it is read at import only). Overrides are process-wide, not per thread:
autograd runs a CUDA backward on its own thread, and it must see the forward's choices.
This module imports no torch, so a CLI's ``--help`` can list the choices at once.
"""
import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Optional

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "triton", "onednn", "eager")
ATTENTIONS = ("auto", "flex", "sdpa")
GEMM_PATHS = ("auto", "fused", "cublas")
DEVICE_PATHS = ("cpu", "cuda")

# Field -> the environment variable that supplies its default.
ENVIRONMENT = {"backend": "LORAKERNELS_BACKEND", "attention": "LORAKERNELS_ATTENTION",
               "gemm": "LORAKERNELS_GEMM"}
AUTOTUNE_ENV = "LORAKERNELS_AUTOTUNE"


@dataclass(frozen=True)
class Settings:
    """backend: ``auto`` runs Triton on CUDA, oneDNN for fp32 CPU tensors (LoRA linears),
    the reference otherwise; ``triton`` forces the kernels (on CPU under
    ``TRITON_INTERPRET=1``), ``onednn`` the oneDNN path where it applies, ``eager`` the
    reference. attention: ``auto`` takes FlexAttention on CUDA when a batch needs a mask,
    ``flex`` always (CPU: forward only), ``sdpa`` never. gemm: ``auto`` times the fused
    GEMM against cuBLAS + epilogue once per shape on a GPU, or forces one of them.
    device_path: run the code path of this device type (``cuda``: Triton, FlexAttention)
    whatever device the tensors are on, as a memory plan of a GPU run on a CPU needs;
    None: each tensor's own device decides.
    """

    backend: str = "auto"
    attention: str = "auto"
    gemm: str = "auto"
    device_path: Optional[str] = None

    def __post_init__(self):
        for name, choices in (("backend", BACKENDS), ("attention", ATTENTIONS),
                              ("gemm", GEMM_PATHS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of "
                                 f"{', '.join(choices)}")
        if self.device_path is not None and self.device_path not in DEVICE_PATHS:
            raise ValueError(f"device_path {self.device_path!r} is not one of "
                             f"{', '.join(DEVICE_PATHS)} or None")

    def on_cuda_path(self, device: "torch.device") -> bool:
        """Whether work on ``device`` takes the CUDA code path."""
        return (self.device_path or device.type) == "cuda"


def _choice(environ: Mapping[str, str], variable: str, choices) -> str:
    value = environ.get(variable, "auto").strip().lower() or "auto"
    if value not in choices:
        raise ValueError(f"{variable}={environ[variable]!r} is not one of {', '.join(choices)}")
    return value


def from_environment(environ: Mapping[str, str] = os.environ) -> Settings:
    """The defaults that ``environ``'s LORAKERNELS_* variables give (unset: ``auto``)."""
    choices = {"backend": BACKENDS, "attention": ATTENTIONS, "gemm": GEMM_PATHS}
    return Settings(**{field: _choice(environ, variable, choices[field])
                       for field, variable in ENVIRONMENT.items()})


def autotune_from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """``LORAKERNELS_AUTOTUNE=0`` pins each kernel role to its default config."""
    return environ.get(AUTOTUNE_ENV, "1").strip() != "0"


@functools.lru_cache(maxsize=1)
def _defaults() -> Settings:
    return from_environment()


_overrides: list = []


def current() -> Settings:
    """The settings in force: the innermost ``override``, else the environment's."""
    return _overrides[-1] if _overrides else _defaults()


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Run a block with some settings changed (the rest as they are); None values are
    left as they are, so a CLI may pass its optional flags straight through."""
    settings = dataclasses.replace(current(), **{name: value for name, value in changes.items()
                                                  if value is not None})
    _overrides.append(settings)
    try:
        yield settings
    finally:
        _overrides.pop()

"""lorakernels.settings: the environment's defaults, overrides, and what the ops read."""
import pytest
import torch

from lorakernels import settings
from lorakernels.attention import attention_plan
from lorakernels.functional import selected_backend
from lorakernels.settings import Settings, from_environment


def test_environment_supplies_the_defaults():
    assert from_environment({}) == Settings()
    env = {"LORAKERNELS_BACKEND": " Eager ", "LORAKERNELS_ATTENTION": "sdpa",
           "LORAKERNELS_GEMM": "", "LORAKERNELS_AUTOTUNE": "0"}
    assert from_environment(env) == Settings(backend="eager", attention="sdpa", gemm="auto")
    assert not settings.autotune_from_environment(env)
    assert settings.autotune_from_environment({})


@pytest.mark.parametrize("variable, value, choices", [
    ("LORAKERNELS_BACKEND", "cuda", "auto, triton, onednn, eager"),
    ("LORAKERNELS_ATTENTION", "flash", "auto, flex, sdpa"),
    ("LORAKERNELS_GEMM", "cuda", "auto, fused, cublas"),
])
def test_a_bad_variable_is_named(variable, value, choices):
    with pytest.raises(ValueError, match=f"^{variable}='{value}' is not one of {choices}$"):
        from_environment({variable: value})


def test_a_bad_choice_is_named():
    with pytest.raises(ValueError, match="backend 'cuda' is not one of auto, triton"):
        Settings(backend="cuda")
    with pytest.raises(ValueError, match="device_path 'tpu' is not one of cpu, cuda or None"):
        Settings(device_path="tpu")


def test_override_nests_and_restores():
    before = settings.current()
    with settings.override(backend="eager") as outer:
        assert settings.current() is outer and outer.backend == "eager"
        with settings.override(attention="sdpa", gemm=None):  # None: left as it is
            assert settings.current() == Settings("eager", "sdpa", before.gemm, before.device_path)
        assert settings.current() is outer
    assert settings.current() == before
    with pytest.raises(RuntimeError), settings.override(backend="eager"):
        raise RuntimeError
    assert settings.current() == before  # restored on an exception too


def test_the_cuda_path_on_cpu_tensors():
    """device_path 'cuda' picks what a GPU run would (Triton, FlexAttention) for CPU tensors:
    a memory plan of a GPU run counts that path."""
    x = torch.zeros(2, 4)
    segments = torch.zeros(1, 8, dtype=torch.long)
    with settings.override(backend="auto", attention="auto"):
        assert selected_backend(x) != "triton"
        assert attention_plan(segments, 8, 8, None, x.device).kind == "conversations"
        with settings.override(device_path="cuda"):
            assert selected_backend(x) == "triton"
            assert settings.current().on_cuda_path(x.device)
        with settings.override(device_path="cpu"):
            assert not settings.current().on_cuda_path(torch.device("cuda"))

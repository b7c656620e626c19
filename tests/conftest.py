"""Without a GPU, Triton kernels run in its interpreter (must be set before triton decorates them)."""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A small chat file: the first 48 example conversations."""
    lines = (Path(__file__).resolve().parents[1] / "examples" / "chat.jsonl").read_text().splitlines()
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("\n".join(lines[:48]) + "\n")
    return str(path)

"""merge.py and generate.py on an adapter trained by train.py."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generate import build_parser, load
from model import Phi3ForCausalLM
from training.config import TrainConfig
from training.loop import train
from conftest import subprocess_timeout
from model.chat import stop_ids

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=str(ROOT / "examples" / "chat.jsonl"), output=str(out), max_steps=4,
                      device="cpu", max_seq_len=128, lora_r=4, seed=5), log=lambda _: None)
    return out / "final"


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=subprocess_timeout(300))


def test_merged_checkpoint_equals_base_plus_adapter(adapter, tmp_path):
    result = run("merge.py", "--adapter", adapter, "--output", tmp_path / "merged", "--seed", 5,
                 "--dtype", "float32", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    merged = Phi3ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    args = build_parser().parse_args(["--model", "phi3-tiny", "--seed", "5", "--dtype", "float32",
                                      "--device", "cpu", "--adapter", str(adapter),
                                      "--prompt", "unused"])
    with_adapter, _, _ = load(args)
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), with_adapter(ids), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    from model.tokenizer import load_tokenizer

    merged_tokenizer, tokenizer = load_tokenizer(tmp_path / "merged"), load_tokenizer()
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    assert stop_ids(merged_tokenizer) == stop_ids(tokenizer)


def test_generate_answers_a_prompt(adapter):
    # Sampled: greedy decoding of a base trained 4 steps may repeat a space, which prints as "".
    result = run("generate.py", "--adapter", adapter, "--seed", 5, "--device", "cpu",
                 "--prompt", "What is 2 plus 3?", "--max-new-tokens", 8, "--temperature", 0.7)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_generate_needs_a_prompt():
    result = run("generate.py")
    assert result.returncode == 2 and "--prompt TEXT or --chat" in result.stderr

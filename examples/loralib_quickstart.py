"""The Phi-3 Cookbook's loralib steps, with lorakernels in place of loralib.

Run: python examples/loralib_quickstart.py
"""
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import lorakernels as lora

torch.manual_seed(0)

# 1. Swap nn.Linear for lora.Linear; a fused qkv projection becomes a MergedLinear.
model = nn.Sequential(
    lora.MergedLinear(64, 3 * 64, r=8, lora_alpha=16, enable_lora=[True, False, True]),
    nn.GELU(),
    lora.Linear(3 * 64, 64, r=8, lora_alpha=16, lora_dropout=0.05),
)

# 2. Only LoRA parameters train.
lora.mark_only_lora_as_trainable(model)
trainable = [p for p in model.parameters() if p.requires_grad]
print(f"trainable parameters: {sum(p.numel() for p in trainable)} "
      f"of {sum(p.numel() for p in model.parameters())}")

# Learn a random linear map for a few steps.
target = nn.Linear(64, 64)
optimizer = torch.optim.AdamW(trainable, lr=1e-2)
for _ in range(50):
    x = torch.randn(32, 64)
    loss = nn.functional.mse_loss(model(x), target(x).detach())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"loss after 50 steps: {loss.item():.4f}")

# 3. Save only the LoRA parameters (safetensors), then load base first and LoRA second.
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in lora.lora_state_dict(model).items()}, path)
    restored = model.load_state_dict(load_file(path), strict=False)
    print(f"LoRA checkpoint: {path.stat().st_size} bytes, "
          f"unexpected keys: {restored.unexpected_keys}")

# eval() merges the low-rank update into the frozen weights: no extra cost at inference.
model.eval()
print("merged:", all(m.merged for m in model if isinstance(m, lora.LoRALayer)))

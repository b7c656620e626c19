"""A preallocated key/value cache for generation: one buffer per layer, filled left to right."""
from typing import Tuple

import torch

from .config import Phi3Config


class KVCache:
    """Keys and values of every layer, [B, kv_heads, max_len, head_dim] each.

    ``length`` tokens are stored; a forward pass writes its T new tokens at
    ``[length, length + T)`` in every layer, and the last layer's write advances ``length``.
    """

    def __init__(self, config: Phi3Config, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device)
                     for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, H, T, D]; return all stored so far, these included."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this step needs {end}")
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        stored = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        if layer == len(self.keys) - 1:  # every layer has this step's tokens now
            self.length = end
        return stored

"""Phi-3 as a plain PyTorch module tree whose parameter names equal Hugging Face's.

Data flows RMSNorm → attention (fused qkv, RoPE, ``lorakernels.attention``) → residual →
RMSNorm → MLP (fused gate_up, SwiGLU) → residual, N times, then the final norm and lm_head.
Numerics follow transformers' Phi3 (RMSNorm in fp32, cos/sin in the activation
dtype, LongRoPE's long factors when positions pass the original context, RoPE on the
first ``rotary_dim`` dims of each head when ``partial_rotary_factor`` < 1, as Phi-4-mini).
RMSNorm, RoPE and SwiGLU are ``lorakernels.functional``'s, which runs them as fused Triton
kernels or as the eager reference (``lorakernels.settings``), like the LoRA layers.
"""
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lorakernels.attention import AttentionPlan, attention, attention_plan
from lorakernels.functional import rms_norm, rope, swiglu
from lorakernels.offloaded_checkpoint import OffloadedInputs, offloaded_checkpoint, offloads_on

from .config import Phi3Config
from .kv_cache import KVCache
from .loading import (CONFIG_FILE, load_safetensors_checkpoint, resolve_checkpoint_dir,
                      save_safetensors_checkpoint)


class Phi3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Phi3RotaryEmbedding(nn.Module):
    """cos/sin for given positions; LongRoPE switches to long factors past the original context.

    Sized to the rotated dims (``config.rotary_dim``, all of head_dim unless
    ``partial_rotary_factor`` < 1): ``functional.rope`` passes the rest of each head through.
    """

    def __init__(self, config: Phi3Config):
        super().__init__()
        dim = config.rotary_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        base_freq = config.rope_theta ** exponents
        scaling = config.rope_scaling
        short = torch.tensor(scaling["short_factor"]) if scaling else torch.ones(dim // 2)
        long = torch.tensor(scaling["long_factor"]) if scaling else torch.ones(dim // 2)
        self.register_buffer("short_inv_freq", 1.0 / (short * base_freq), persistent=False)
        self.register_buffer("long_inv_freq", 1.0 / (long * base_freq), persistent=False)
        self.original_max_positions = config.original_max_position_embeddings
        self.attention_scaling = config.rope_attention_scaling
        self.longrope = scaling is not None

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B, T] → cos, sin [B, T, rotary_dim] in ``dtype``."""
        inv_freq = self.short_inv_freq
        if self.longrope and int(position_ids.max()) + 1 > self.original_max_positions:
            inv_freq = self.long_inv_freq
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return ((angles.cos() * self.attention_scaling).to(dtype),
                (angles.sin() * self.attention_scaling).to(dtype))


class Phi3Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.sliding_window = config.sliding_window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # Registered in Hugging Face's order, so state dicts list keys identically.
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(config.qkv_split_sizes), bias=False)
        self.split_sizes = config.qkv_split_sizes

    def forward(self, x, cos, sin, plan: Optional[AttentionPlan] = None,
                cache: Optional[KVCache] = None):
        """``plan``: Phi3Model's one per batch (packing, window, cache); None is causal."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        out = attention(q, k, v, plan)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


# Above this many tokens the MLP runs in tiles of this many: its [T, 2·intermediate] gate_up
# output never exists whole (4.3 GB per layer for Phi-3-mini at 131,072 tokens in bf16).
MLP_TILE_TOKENS = 8192


class Phi3MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.tile_tokens = MLP_TILE_TOKENS

    def forward(self, x):
        if x.shape[:-1].numel() <= self.tile_tokens:
            return self.gate_up_down(x)
        return self.tiled(x)

    def gate_up_down(self, x):
        return self.down_proj(swiglu(self.gate_up_proj(x)))

    def tiled(self, x):
        """The MLP over tiles of ``tile_tokens`` tokens (Arctic Long Sequence Training's tiled
        MLP), each tile checkpointed: the forward keeps no tile's gate_up, the backward
        recomputes and backpropagates one tile at a time. Rows are independent, so the loss and
        gradients equal the whole MLP's (tests/test_long_context.py)."""
        tiles = x.reshape(-1, x.shape[-1]).split(self.tile_tokens)
        if torch.is_grad_enabled():
            outs = [checkpoint(self.gate_up_down, tile, use_reentrant=False) for tile in tiles]
        else:
            outs = [self.gate_up_down(tile) for tile in tiles]
        return torch.cat(outs).view(*x.shape[:-1], -1)


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_index: int):
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_index)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, plan=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Phi3RotaryEmbedding(config)
        self.sliding_window = config.sliding_window
        self.gradient_checkpointing = False

    def forward(self, input_ids, position_ids=None, segment_ids=None, cache=None):
        B, T = input_ids.shape
        if position_ids is None:
            start = 0 if cache is None else cache.length
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        # Built once per batch (a mask, a conversation layout or a FlexAttention block mask)
        # and shared by every layer.
        key_len = T + (cache.length if cache is not None else 0)
        plan = attention_plan(segment_ids, T, key_len, self.sliding_window, input_ids.device,
                              cached=cache is not None)
        offloaded = OffloadedInputs() if self.offloads_checkpoints(x.device) else None
        for layer in self.layers:
            if offloaded is not None:
                x = offloaded_checkpoint(partial(layer, cos=cos, sin=sin, plan=plan), x, offloaded)
            elif self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, plan, use_reentrant=False)
            else:
                x = layer(x, cos, sin, plan, cache)
        return self.norm(x)

    def offloads_checkpoints(self, device: torch.device) -> bool:
        """``offload`` checkpointing on the CUDA path (elsewhere it is on-device checkpointing:
        a CPU's host memory is its memory)."""
        return (self.gradient_checkpointing == "offload" and self.training
                and torch.is_grad_enabled() and offloads_on(device))


class Phi3ForCausalLM(nn.Module):
    """Phi-3 with the LM head. ``model(input_ids)`` → logits [B, T, vocab].

    ``position_ids`` [B, T] and ``segment_ids`` [B, T] (one id per packed
    conversation) are optional: packed sequences restart positions per segment
    and never attend across segments.
    """

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Under ``tie_word_embeddings`` (Phi-4-mini) the LM head's weight is the embedding
        table itself, one Parameter. Called again wherever parameters are replaced (loading,
        ``to_empty``), which unties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rotary(self, device: Union[str, torch.device]) -> None:
        """Compute the RoPE tables on ``device``: they are not in checkpoints, and a model
        built on the meta device has none."""
        self.model.rotary_emb = Phi3RotaryEmbedding(self.config).to(device)

    def set_gradient_checkpointing(self, mode: Union[bool, str] = True) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations: True
        keeps each layer's input on the device, ``"offload"`` in pinned host memory (CUDA;
        on a CPU the same as True), False keeps every activation."""
        if mode not in (True, False, "offload"):
            raise ValueError(f"gradient checkpointing is True, False or 'offload', got {mode!r}")
        self.model.gradient_checkpointing = mode

    def set_mlp_tile_tokens(self, tokens: int) -> None:
        """Run each MLP in tiles of ``tokens`` tokens when a batch has more (default
        ``MLP_TILE_TOKENS``)."""
        for layer in self.model.layers:
            layer.mlp.tile_tokens = tokens

    def forward(self, input_ids, position_ids=None, segment_ids=None,
                cache: Optional[KVCache] = None):
        return self.lm_head(self.model(input_ids, position_ids, segment_ids, cache))

    def generate(self, input_ids: torch.Tensor, **options) -> torch.Tensor:
        """See ``model.generation.generate``: KV-cached greedy or top-p sampling."""
        from .generation import generate

        return generate(self, input_ids, **options)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: Union[str, Path], dtype: torch.dtype = torch.bfloat16,
                        device: Union[str, torch.device] = "cpu",
                        revision: Optional[str] = None,
                        quantize: Optional[str] = None) -> "Phi3ForCausalLM":
        """A local checkpoint directory or a hub id (e.g. microsoft/Phi-3-mini-4k-instruct).

        ``quantize="nf4"``: QLoRA's 4-bit base, each decoder linear weight quantised as it
        is read (``model.quantization``); products still come out in ``dtype``.
        """
        from .quantization import quantize_decoder_linears, uses_nf4

        nf4 = uses_nf4(quantize)
        directory = resolve_checkpoint_dir(path_or_repo_id, revision)
        config = Phi3Config.from_json(directory / CONFIG_FILE)
        with torch.device("meta"):  # no memory until the checkpoint's tensors arrive
            model = cls(config)
        if nf4:
            quantize_decoder_linears(model, dtype)
        load_safetensors_checkpoint(model, directory, dtype, device)
        model.tie_weights()
        model.init_rotary(device)
        return model

    def save_pretrained(self, directory: Union[str, Path], max_shard_bytes: Optional[int] = None):
        """config.json and safetensors (sharded with an index past ``max_shard_bytes``)."""
        from .quantization import is_quantized

        if is_quantized(self):
            raise ValueError("save_pretrained writes dense checkpoints; this model's base is 4-bit "
                             "(NF4). Save the LoRA adapter instead, or load the base without "
                             "quantize= to save it")
        state = dict(self.state_dict())
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_safetensors_checkpoint(state, self.config, directory, max_shard_bytes)

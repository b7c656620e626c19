"""Text generation with a KV cache: greedy, temperature and top-p sampling, the checkpoint's stop
ids."""
from typing import Iterable, Optional

import torch

from .kv_cache import KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, vocab] → next ids [B]; greedy when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: Optional[Iterable[int]] = None,
             pad_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Continue ``input_ids`` [B, T]; returns [B, T + n] with n <= max_new_tokens.

    A sequence ends at its first stop id (kept in the output) and is padded with
    ``pad_id`` while the others go on; generation stops when all have ended.
    Defaults: the model config's eos and pad ids; chat callers pass the tokenizer's
    ``stop_ids`` (which add the chat template's end of turn) and ``pad_id``.
    """
    config = model.config
    if stop_ids is None:
        stop_ids = () if config.eos_token_id is None else (config.eos_token_id,)
    if pad_id is None:
        pad_id = (config.pad_token_id if config.pad_token_id is not None
                  else config.eos_token_id or 0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be [batch, tokens] with tokens > 0, "
                         f"got {tuple(input_ids.shape)}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    was_training = model.training
    model.eval()
    batch, prompt_len = input_ids.shape
    weight = model.lm_head.weight
    cache = KVCache(model.config, batch, prompt_len + max_new_tokens, weight.dtype, weight.device)
    stops = torch.tensor(sorted(set(stop_ids)), device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens = [input_ids]
    step_input = input_ids
    for _ in range(max_new_tokens):
        # Only the last position's logits: the prompt's other [T, vocab] rows are never needed.
        logits = model.lm_head(model.model(step_input, cache=cache)[:, -1])
        next_ids = sample_next(logits, temperature, top_p, generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        tokens.append(next_ids[:, None])
        finished |= torch.isin(next_ids, stops)
        if finished.all():
            break
        step_input = next_ids[:, None]
    model.train(was_training)
    return torch.cat(tokens, dim=1)

"""Token generation over the torch reference (greedy or sampled), with the static cache."""

from __future__ import annotations

from typing import Iterator

import torch


def sample_next(logits_V: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    """Greedy when ``temperature == 0``; else temperature + top-k + top-p (nucleus) sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits_V))
    logits = logits_V.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, *, pixel_values=None, image_grid_thw=None, image_embeds=None,
             pixel_values_videos=None, video_grid_thw=None, max_new_tokens: int = 16,
             eos_token_id: int | tuple[int, ...] | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
    """Yield new token ids for one sequence ``input_ids [1, S]`` until EOS or ``max_new_tokens``.

    ``image_embeds`` (already projected image tokens, e.g. from a separate vision step) replace
    ``pixel_values``; they are spliced at the image placeholder ids.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, S], got {tuple(input_ids.shape)}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or ()))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    S = input_ids.shape[1]
    cache = model.new_cache(1, S + max_new_tokens)
    if image_embeds is not None:
        embeds = model.splice(model.model.language_model.embed_tokens(input_ids), input_ids, image_embeds,
                              model.config.image_token_id)
        logits, cache = model(inputs_embeds=embeds, cache=cache)
    else:
        logits, cache = model(input_ids, pixel_values, image_grid_thw, cache, pixel_values_videos=pixel_values_videos,
                              video_grid_thw=video_grid_thw)
    for _ in range(max_new_tokens):
        tok = sample_next(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        yield tok
        if tok in eos:
            return
        logits, cache = model(torch.tensor([[tok]]), cache=cache)


def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, **kw) -> list[int]:
    return list(generate(model, input_ids, max_new_tokens=max_new_tokens, **kw))

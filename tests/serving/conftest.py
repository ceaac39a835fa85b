"""Serving-test fixtures: the torch reference answer for a prompt (+ images) on the tiny checkpoint."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def reference(tiny_ckpt):
    """``reference(prompt, images=(), max_tokens=10, **sampling) -> (token ids, text)``.

    ``m3_trt.model.generate`` in-process on the processor's output, pixel_values going through the
    model's own vision path (the served path runs the vision encoder as a separate model and
    splices image_embeds), so a match also checks the split.
    """
    import torch

    from m3_trt.model.generate import generate
    from m3_trt.model.modeling import M3ForConditionalGeneration
    from m3_trt.processing import M3Processor

    proc = M3Processor.from_pretrained(tiny_ckpt)
    model = M3ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32)
    eos = model.config.text.eos_token_id

    def run(prompt, images=(), max_tokens=10, **kw):
        pics = [proc.decode_image(b) for b in images]
        enc = proc(proc.chat_prompt(prompt, len(pics)), images=pics or None)
        toks = list(generate(model, enc["input_ids"], pixel_values=enc.get("pixel_values"),
                             image_grid_thw=enc.get("image_grid_thw"), max_new_tokens=max_tokens,
                             eos_token_id=eos, **kw))
        return toks, proc.decode(toks)

    run.processor = proc
    run.model = model
    return run

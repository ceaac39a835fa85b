"""Rank body for test_sharded: every case of one world size in one spawned process group."""

from __future__ import annotations

import json

import torch

PROMPT_LEN, DECODE_STEPS = 70, 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def run_cases(rank: int, world: int, ckpt: str, cases: list[tuple[str, int, int, bool]], out_file: str) -> None:
    from m3_trt.model.modeling import M3ForConditionalGeneration
    from m3_trt.model.rank import RankModel
    from m3_trt.model.shard import Layout

    ref = M3ForConditionalGeneration.from_pretrained(ckpt)
    V = ref.config.text.vocab_size
    ids = torch.randint(0, ref.config.image_token_id, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    cache = ref.new_cache(1, PROMPT_LEN + DECODE_STEPS + 1)
    logits, cache = ref(ids, cache=cache)
    ref_logits, toks = [logits], []
    for _ in range(DECODE_STEPS):
        toks.append(int(logits[0, -1].argmax()))
        logits, cache = ref(torch.tensor([[toks[-1]]]), cache=cache)
        ref_logits.append(logits)
    assert max(toks) < V
    results = {}
    for name, tp, ep, wrong_rank in cases:
        lay = Layout.of(tp, ep)
        assert lay.world == world, (name, lay, world)
        shard_rank = 0 if wrong_rank else rank  # every rank holding rank 0's slice
        rm = RankModel.from_full(ref, lay, shard_rank)
        c = rm.new_cache(1, PROMPT_LEN + DECODE_STEPS + 1)
        logits, c = rm(ids, cache=c)
        errs = [rel(logits, ref_logits[0])]
        for i, t in enumerate(toks):
            logits, c = rm(torch.tensor([[t]]), cache=c)
            errs.append(rel(logits, ref_logits[i + 1]))
        results[name] = {"prefill": errs[0], "decode": errs[1:], "kv_heads_per_rank": rm.local_text.num_key_value_heads}
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)

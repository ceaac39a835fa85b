"""Build a transformers MiniMax-M3-VL and our reference with the same random weights."""

from __future__ import annotations

import torch

BASE_TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, dense_intermediate_size=48, shared_intermediate_size=24,
    num_local_experts=8, num_experts_per_tok=2, index_n_heads=2, index_head_dim=16, index_block_size=8,
    index_topk_blocks=2, index_local_blocks=1,
    layer_types=["full_attention", "minimax_m3_sparse", "minimax_m3_sparse", "full_attention"],
    mlp_layer_types=["dense", "sparse", "dense", "sparse"],
    bos_token_id=None, eos_token_id=1,
)
BASE_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
IMAGE_TOKEN, VIDEO_TOKEN = 500, 501


def hf_config(text_overrides: dict | None = None, rotary_fraction: float = 0.5):
    from transformers import MiniMaxM3VLConfig

    text = dict(BASE_TEXT, **(text_overrides or {}))
    text["rotary_dim"] = int(text["head_dim"] * rotary_fraction)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": rotary_fraction}
    return MiniMaxM3VLConfig(text_config=text, vision_config=dict(BASE_VISION), image_token_index=IMAGE_TOKEN,
                             video_token_index=VIDEO_TOKEN, projector_hidden_size=64)


def make_pair(text_overrides: dict | None = None, seed: int = 0):
    """(transformers model, our model), fp32, eval, identical weights (norms and biases randomised)."""
    from transformers import MiniMaxM3SparseForConditionalGeneration

    from m3_trt.model.config import M3Config
    from m3_trt.model.modeling import M3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = hf_config(text_overrides)
    hf = MiniMaxM3SparseForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.normal_(0, 0.1)
            elif p.dim() >= 2 and "embed_tokens" not in name:
                p.normal_(0, 0.6 / p.shape[-1] ** 0.5)
            elif "embed_tokens" in name:
                p.normal_(0, 1.0)
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    ours = M3ForConditionalGeneration(M3Config.from_dict(cfg.to_dict())).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    return hf, ours


def random_vision_inputs(grids: list[tuple[int, int, int]], patch_dim: int = 3 * 2 * 14 * 14, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids, dtype=torch.long)
    n = int(grid.prod(-1).sum())
    return torch.randn(n, patch_dim, generator=g), grid


def prompt_with(placeholders: list[tuple[int, int]], n_text: int = 9, vocab: int = 400, seed: int = 0):
    """Random text around runs of (token, count) placeholders: ``[1, S]``."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, vocab, (n_text,), generator=g)]
    for tok, count in placeholders:
        parts += [torch.full((count,), tok), torch.randint(0, vocab, (n_text,), generator=g)]
    return torch.cat(parts)[None]

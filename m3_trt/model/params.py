"""Parameter counts of an M3-VL config, from the config alone (the ``info`` command and the plan's checks)."""

from __future__ import annotations

from m3_trt.model.config import M3Config


def param_counts(cfg: M3Config) -> dict[str, int]:
    """Total parameters and parameters active per text token (``k`` of ``E`` routed experts)."""
    t, v = cfg.text, cfg.vision
    H, D, Hq, G = t.hidden_size, t.head_dim, t.num_attention_heads, t.num_key_value_heads
    attn = H * Hq * D * 2 + H * G * D * 2 + 2 * D
    indexer = H * t.index_n_heads * t.index_head_dim + H * t.index_head_dim + 2 * t.index_head_dim
    dense = 3 * H * t.dense_intermediate_size
    expert = 3 * H * t.intermediate_size
    shared = 3 * H * t.shared_intermediate_size
    router = t.num_local_experts * H + t.num_local_experts
    total_text, active_text = 0, 0
    for lt, mt in zip(t.layer_types, t.mlp_layer_types):
        layer = attn + 2 * H + (indexer if lt == "minimax_m3_sparse" else 0)
        if mt == "sparse":
            total_text += layer + router + shared + t.num_local_experts * expert
            active_text += layer + router + shared + t.num_experts_per_tok * expert
        else:
            total_text += layer + dense
            active_text += layer + dense
    emb = t.vocab_size * H
    head = 0 if cfg.tie_word_embeddings else t.vocab_size * H
    vl = v.hidden_size * (4 * v.hidden_size + 4) + 2 * v.hidden_size * v.intermediate_size \
        + v.intermediate_size + v.hidden_size + 4 * v.hidden_size
    vision = v.patch_dim * v.hidden_size + 2 * v.hidden_size + v.num_hidden_layers * vl
    P = cfg.projector_hidden_size
    proj = v.hidden_size * P + P + P * H + H + cfg.merged_hidden_size * P + P + P * H + H
    return {
        "total": total_text + emb + head + t.hidden_size + vision + proj,
        "text_decoder": total_text,
        "active_per_token": active_text + emb // t.vocab_size + head + t.hidden_size,
        "vision_tower": vision,
        "projector": proj,
        "embedding": emb,
        "lm_head": head,
    }

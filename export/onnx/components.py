"""The exportable components of MiniMax-M3-VL, each a small ``nn.Module`` over the reference.

Legend: B batch, S new tokens, T static cache length (slot == position), H hidden, G KV heads,
D head dim, Di indexer head dim, N vision patches, P patch dim, Dv vision hidden.

Decoder-layer components take and return their caches, so one graph serves prefill (S > 1) and
decode (S == 1): ``(hidden_BSH, position_ids_BS, k_cache_BGTD, v_cache_BGTD[, idx_cache_BTDi])
-> (hidden_BSH, k_cache_BGTD, v_cache_BGTD[, idx_cache_BTDi, block_idx_BGSK])``: sparse layers also
return the indexer's block choices (int32) so every backend can be compared block by block.
The head returns the logits and the final-norm hidden state.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from m3_trt.model.cache import LayerCache
from m3_trt.model.modeling import DecoderLayer, M3ForConditionalGeneration, rope_cos_sin


class Embedding(nn.Module):
    def __init__(self, model: M3ForConditionalGeneration):
        super().__init__()
        self.embed_tokens = model.model.language_model.embed_tokens

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids_BS)


class DecoderLayerComponent(nn.Module):
    def __init__(self, model: M3ForConditionalGeneration, index: int):
        super().__init__()
        self.text_cfg = model.config.text
        self.layer: DecoderLayer = model.model.language_model.layers[index]
        self.sparse = self.layer.self_attn.indexer is not None

    def forward(self, hidden_BSH, position_ids_BS, k_cache_BGTD, v_cache_BGTD, idx_cache_BTD=None):
        cos, sin = rope_cos_sin(position_ids_BS, self.text_cfg, hidden_BSH.dtype)
        cache = LayerCache(k_cache_BGTD, v_cache_BGTD, idx_cache_BTD)
        out, block_idx = self.layer(hidden_BSH, cos, sin, position_ids_BS, cache, return_block_idx=True)
        if self.sparse:
            return out, cache.k_BGTD, cache.v_BGTD, cache.idx_k_BTD, block_idx
        return out, cache.k_BGTD, cache.v_BGTD


class Head(nn.Module):
    """Final RMSNorm + LM head."""

    def __init__(self, model: M3ForConditionalGeneration):
        super().__init__()
        self.norm = model.model.language_model.norm
        self.lm_head = model.lm_head

    def forward(self, hidden_BSH):
        normed = self.norm(hidden_BSH)
        return self.lm_head(normed), normed


class VisionEncoder(nn.Module):
    """Patch embed + vision layers; segment ids and (t, h, w) positions come in as inputs."""

    def __init__(self, model: M3ForConditionalGeneration):
        super().__init__()
        self.tower = model.model.vision_tower

    def forward(self, pixel_values_NP, vision_pos_N3, segment_ids_N):
        return self.tower(pixel_values_NP, vision_pos_N3, segment_ids_N)


class Projector(nn.Module):
    def __init__(self, model: M3ForConditionalGeneration):
        super().__init__()
        self.proj = model.model.multi_modal_projector

    def forward(self, vision_feats_ND):
        return self.proj(vision_feats_ND)

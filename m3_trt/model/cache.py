"""Static KV cache for the M3 decoder, including the lightning indexer's keys.

Legend: B batch, G KV heads, T max cache length (slot == absolute position), D head dim,
Di indexer head dim.

Per layer: ``k_BGTD`` / ``v_BGTD``; sparse layers also keep ``idx_k_BTDi``. New entries are
written at their positions (``scatter`` along T), so one graph serves prefill (many positions)
and decode (one). Unwritten slots hold zeros; they sit at positions ahead of every query, so the
token-level causal mask (and, in the indexer, the block max over ``-inf``) discards them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerCache:
    k_BGTD: torch.Tensor
    v_BGTD: torch.Tensor
    idx_k_BTD: torch.Tensor | None = None


def write_kv(cache_BGTD: torch.Tensor, new_BGSD: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
    """Out-of-place write of ``new`` at slots ``pos`` (export-friendly ScatterElements)."""
    B, G, S, D = new_BGSD.shape
    index = pos_BS[:, None, :, None].expand(B, G, S, D)
    return cache_BGTD.scatter(2, index, new_BGSD.to(cache_BGTD.dtype))


def write_idx(cache_BTD: torch.Tensor, new_BSD: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
    B, S, D = new_BSD.shape
    return cache_BTD.scatter(1, pos_BS[:, :, None].expand(B, S, D), new_BSD.to(cache_BTD.dtype))


@dataclass
class StaticCache:
    layers: list[LayerCache]
    length: int = 0  # tokens written so far (same for every row)
    max_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_len = self.layers[0].k_BGTD.shape[2]

    @classmethod
    def allocate(cls, text_cfg, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> "StaticCache":
        if max_len > text_cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={text_cfg.max_position_embeddings}")
        G, D = text_cfg.num_key_value_heads, text_cfg.head_dim
        layers = []
        for t in text_cfg.layer_types:
            kv = dict(k_BGTD=torch.zeros(batch, G, max_len, D, dtype=dtype, device=device),
                      v_BGTD=torch.zeros(batch, G, max_len, D, dtype=dtype, device=device))
            if t == "minimax_m3_sparse":
                kv["idx_k_BTD"] = torch.zeros(batch, max_len, text_cfg.index_head_dim, dtype=dtype, device=device)
            layers.append(LayerCache(**kv))
        return cls(layers=layers)

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise ValueError(f"cache full: {self.length} + {n_new} tokens exceed max_len={self.max_len}")

"""MiniMax-M3-VL vision tower and projector (CLIP-style, Conv3d patches, 3D RoPE).

Legend: N patches (all images packed), P patch dim (C·tp·p·p), Dv vision hidden, Dt text hidden.

Pixels arrive flattened per patch ``[N, P]`` in the processor's block-major merge order. The
patch embedding is a Conv3d whose stride equals its kernel, i.e. a linear map of each patch.
Each image (or video clip: all its frames, ``merge_temporal``) attends only within itself;
``image_grid_thw`` ``[n, 3]`` gives the segments and the (t, h, w) RoPE coordinates: per axis
``2·((Dh//3)//2)`` rotated dims, laid out ``[t‖h‖w] ‖ [t‖h‖w]`` (the rest pass through).
The projector maps each patch Dv → Dt (GELU MLP), then fuses each 2×2 merge group (4 patches,
consecutive in that order) into one Dt token with a second GELU MLP.

The per-image segmentation is a block-diagonal ``[N, N]`` mask from segment ids, so the tower is
one static graph for export; its memory is quadratic in the patches of one request (fine for the
pixel budgets a server enforces; a per-image loop or a varlen kernel avoids it on long videos).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3_trt.model.config import M3Config, VisionConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """``[N, 3]`` (t, h, w) coordinates of each patch, block-major over merge×merge groups."""
    out = []
    for t, h, w in grid_thw.tolist():
        hp, wp = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hp = hp.reshape(shape).transpose(1, 2).flatten()
        wp = wp.reshape(shape).transpose(1, 2).flatten()
        tp = torch.arange(t).repeat_interleave(h * w)
        out.append(torch.stack([tp, hp.repeat(t), wp.repeat(t)], dim=-1))
    return torch.cat(out, dim=0)


def vision_segment_ids(grid_thw: torch.Tensor) -> torch.Tensor:
    """``[N]`` image index of each patch (one attention segment per image / clip)."""
    sizes = (grid_thw[:, 0] * grid_thw[:, 1] * grid_thw[:, 2]).to(torch.long)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def vision_rope(pos_N3: torch.Tensor, cfg: VisionConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = 2 * ((cfg.head_dim // 3) // 2)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    freqs = (pos_N3[..., None].float() * inv_freq).flatten(1)  # [N, 3·spatial/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.num_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, pixels_NP: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels_NP.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x_ND, cos, sin, keep_NN: torch.Tensor) -> torch.Tensor:
        N = x_ND.shape[0]
        q, k, v = (p(x_ND).view(N, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        rot = cos.shape[-1]
        c, s = cos[:, None, :], sin[:, None, :]
        q = torch.cat([q[..., :rot] * c + rotate_half(q[..., :rot]) * s, q[..., rot:]], dim=-1)
        k = torch.cat([k[..., :rot] * c + rotate_half(k[..., :rot]) * s, k[..., rot:]], dim=-1)
        # 4-D for the ONNX exporter's SDPA translation
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=keep_NN)
        return self.out_proj(out[0].transpose(0, 1).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, cos, sin, keep):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, keep)
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, pixels_NP: torch.Tensor, pos_N3: torch.Tensor, seg_N: torch.Tensor) -> torch.Tensor:
        """Exportable core: positions and segment ids come in as tensors."""
        x = self.embeddings(pixels_NP).to(self.pre_layrnorm.weight.dtype)
        cos, sin = vision_rope(pos_N3, self.cfg, x.dtype)
        keep = seg_N[:, None] == seg_N[None, :]  # block-diagonal: each image attends within itself
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x, cos, sin, keep)
        return x


class Projector(nn.Module):
    def __init__(self, cfg: M3Config):
        super().__init__()
        dv, dt, dp = cfg.vision.hidden_size, cfg.text.hidden_size, cfg.projector_hidden_size
        self.merge = cfg.vision.spatial_merge_size
        self.linear_1 = nn.Linear(dv, dp)
        self.linear_2 = nn.Linear(dp, dt)
        self.merge_linear_1 = nn.Linear(cfg.merged_hidden_size, dp)
        self.merge_linear_2 = nn.Linear(dp, dt)

    def forward(self, feats_ND: torch.Tensor) -> torch.Tensor:
        h = self.linear_2(F.gelu(self.linear_1(feats_ND)))
        h = h.reshape(h.shape[0] // self.merge**2, -1)
        return self.merge_linear_2(F.gelu(self.merge_linear_1(h)))

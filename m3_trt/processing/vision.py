"""Pixels for MiniMax-M3-VL: smart resize, normalisation and block-major patches (no transformers).

Specification: transformers 5.23 `MiniMaxM3VLImageProcessor` / `MiniMaxM3VLVideoProcessor` and their
bases (`TorchvisionBackend`, `BaseVideoProcessor`). See the package docstring for the layout.

Legend: x_CHW one image (uint8 or float32), frames_TCHW a clip, patches_ND N patches of
D = C·tp·p·p values, grid (t, h, w) in patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w) multiples of `factor`, area within [min_pixels, max_pixels], aspect kept (spec's own)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """One of `preprocessor_config.json` (images) / `video_preprocessor_config.json` (videos)."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = 3  # PIL BICUBIC, the only mode both transformers classes default to
    vision_segment_max_frames: int | None = 4

    @classmethod
    def for_images(cls, cfg: dict) -> "VisionPreprocessConfig":
        # Mirrors MiniMaxM3VLImageProcessor.__init__: `size` {shortest_edge, longest_edge}, overridden
        # by min_pixels / max_pixels; the official `size: [672, 672]` means "use the defaults".
        size = cfg.get("size")
        size = {"shortest_edge": 4 * 28 * 28, "longest_edge": 451584} if size in (None, [672, 672]) else dict(size)
        min_pixels = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        max_pixels = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), **cls._common(cfg))

    @classmethod
    def for_videos(cls, cfg: dict) -> "VisionPreprocessConfig":
        # MiniMaxM3VLVideoProcessor reads min_pixels / max_pixels (class defaults below), not `size`.
        return cls(
            min_pixels=int(cfg.get("min_pixels", 4 * 28 * 28)),
            max_pixels=int(cfg.get("max_pixels", 768 * 28 * 28)),
            vision_segment_max_frames=cfg.get("vision_segment_max_frames", 4),
            **cls._common(cfg),
        )

    @staticmethod
    def _common(cfg: dict) -> dict:
        keys = ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "do_resize", "do_rescale",
                "do_normalize", "resample")
        out = {k: cfg[k] for k in keys if k in cfg}
        out.update({k: tuple(cfg[k]) for k in ("image_mean", "image_std") if k in cfg})
        if out.get("resample", 3) != 3:
            raise ValueError(f"only bicubic resampling (3) is implemented, config has resample={out['resample']}")
        return out

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def image_to_uint8_chw(image: Any) -> torch.Tensor:
    """PIL image or uint8 array (HWC, CHW or HW) → RGB uint8 x_CHW, as TorchvisionBackend.process_image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"images must be PIL.Image or numpy uint8 arrays, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 (0..255), got dtype {image.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(image))
    if x.ndim == 2:
        x = x[None]
    elif x.ndim != 3:
        raise ValueError(f"numpy image must be HW, HWC or CHW, got shape {tuple(image.shape)}")
    elif x.shape[0] not in (1, 3, 4):  # channels-first wins when ambiguous, as in transformers
        if x.shape[2] not in (1, 3, 4):
            raise ValueError(f"cannot tell the channel axis of image shape {tuple(image.shape)}")
        x = x.permute(2, 0, 1)
    return _to_rgb_chw(x).contiguous()


def _to_rgb_chw(x: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as tvF

    x = tvF.grayscale_to_rgb(x)
    if x.shape[-3] == 4:  # alpha onto white, through float like TorchvisionBackend.convert_to_rgb
        y = tvF.to_dtype(x.movedim(-3, -1), torch.float32, scale=True)
        y = y[..., :3] * y[..., 3:] + (1 - y[..., 3:])
        x = tvF.to_dtype(y, torch.uint8, scale=True).movedim(-1, -3)
    return x


def resize_bicubic(x_NCHW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased, on uint8 (rounded back to uint8) — torchvision's path, as the spec."""
    from torchvision.transforms.v2 import functional as tvF

    return tvF.resize(x_NCHW, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def rescale_normalize(x: torch.Tensor, cfg: VisionPreprocessConfig) -> torch.Tensor:
    """float32 (x − mean/rescale) / (std/rescale): the fused form TorchvisionBackend computes."""
    if cfg.do_normalize:
        scale = 1.0 / cfg.rescale_factor if cfg.do_rescale else 1.0
        mean = torch.tensor(cfg.image_mean) * scale
        std = torch.tensor(cfg.image_std) * scale
        return (x.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    if cfg.do_rescale:
        return x * cfg.rescale_factor
    return x.to(torch.float32)


def patchify(frames_TCHW: torch.Tensor, cfg: VisionPreprocessConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pad T to a multiple of tp (repeat last frame), then block-major patches_ND and grid (t, h, w)."""
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pad := -frames_TCHW.shape[0] % tp:
        frames_TCHW = torch.cat([frames_TCHW, frames_TCHW[-1:].expand(pad, -1, -1, -1)], dim=0)
    T, C, H, W = frames_TCHW.shape
    gt, gh, gw = T // tp, H // p, W // p
    x = frames_TCHW.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    # → (t, h-block, w-block, h-in-block, w-in-block, C, tp, p, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, C * tp * p * p), (gt, gh, gw)


def video_frame_size(h: int, w: int, cfg: VisionPreprocessConfig, resize: bool) -> tuple[int, int]:
    """Frame size after preprocessing: smart-resized, or unchanged (then it must be a multiple of 28)."""
    if resize:
        return smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if h % cfg.factor or w % cfg.factor:
        raise ValueError(
            f"video frames of {h}x{w} are not multiples of {cfg.factor}; the M3 processor does not resize videos "
            "by default (pass resize_videos=True, or resize the frames first)"
        )
    return h, w


def preprocess_images(images: Sequence[Any], cfg: VisionPreprocessConfig) -> dict[str, torch.Tensor]:
    """pixel_values float32 [N, C·tp·p·p] and image_grid_thw int64 [n_images, 3]."""
    patches, grids = [], []
    for image in images:
        x_CHW = image_to_uint8_chw(image)
        if cfg.do_resize:
            h, w = smart_resize(x_CHW.shape[1], x_CHW.shape[2], cfg.factor, cfg.min_pixels, cfg.max_pixels)
            x_CHW = resize_bicubic(x_CHW[None], h, w)[0]
        x_CHW = rescale_normalize(x_CHW, cfg)
        p, grid = patchify(x_CHW[None].expand(cfg.temporal_patch_size, -1, -1, -1), cfg)
        patches.append(p)
        grids.append(grid)
    return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def video_to_uint8_tchw(video: Any) -> torch.Tensor:
    """numpy uint8 [T, H, W, 3] (or [T, 3, H, W]) or a list of PIL frames → RGB uint8 frames_TCHW."""
    from PIL import Image

    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("a video needs at least one frame")
        if isinstance(video[0], Image.Image):
            video = np.stack([np.asarray(f.convert("RGB")) for f in video])
        else:
            video = np.stack([np.asarray(f) for f in video])
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4:
        raise TypeError("a video must be a uint8 array [T, H, W, C] / [T, C, H, W] or a list of frames")
    x = torch.from_numpy(np.ascontiguousarray(video))
    if x.shape[1] not in (1, 3):  # channels-first when ambiguous, as transformers' inference
        x = x.permute(0, 3, 1, 2)
    return _to_rgb_chw(x).contiguous()


def preprocess_videos(videos: Sequence[Any], cfg: VisionPreprocessConfig, resize: bool = False) -> dict[str, Any]:
    """pixel_values_videos [N, D], video_grid_thw int64 [n_chunks, 3], num_chunks_per_video, num_frames."""
    patches, grids, chunks_per_video, num_frames = [], [], [], []
    for video in videos:
        x_TCHW = video_to_uint8_tchw(video)
        h, w = video_frame_size(x_TCHW.shape[2], x_TCHW.shape[3], cfg, resize and cfg.do_resize)
        if resize and cfg.do_resize:
            x_TCHW = resize_bicubic(x_TCHW, h, w)
        p, (gt, gh, gw) = patchify(rescale_normalize(x_TCHW, cfg), cfg)
        patches.append(p)
        step = gt if cfg.vision_segment_max_frames is None else cfg.vision_segment_max_frames
        chunks = [[min(step, gt - start), gh, gw] for start in range(0, gt, step)]
        grids.extend(chunks)
        chunks_per_video.append(len(chunks))
        num_frames.append(int(x_TCHW.shape[0]))
    return {
        "pixel_values_videos": torch.cat(patches),
        "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        "num_chunks_per_video": chunks_per_video,
        "num_frames": num_frames,
    }

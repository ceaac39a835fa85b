"""MiniMax-M3-VL input side without transformers: chat template, tokens, pixels, decoding.

Specification: transformers 5.23 `models/minimax_m3_vl/{image,video}_processing_minimax_m3_vl.py`,
`processing_minimax_m3_vl.py` and their bases (`TorchvisionBackend`, `BaseVideoProcessor`,
`ProcessorMixin`). tests/test_processing.py checks equality with `AutoProcessor` output.

Pixels, per image: RGB uint8 (alpha composited onto white) → bicubic antialiased resize (torchvision,
on uint8, as transformers does) to `smart_resize` (h, w multiples of patch·merge = 28, area within
[min_pixels, max_pixels]) → float32 (x − 255·mean) / (255·std) → patches. An image is one frame
repeated `temporal_patch_size` times; a video's frames are padded to a multiple of
`temporal_patch_size` by repeating the last frame. Patch order is block-major: for each temporal
step, for each merge block (row-major over the (h/m, w/m) grid), the m×m patches of that block
row-major — the layout `get_vision_position_ids` and the 2×2 merger expect. Each patch flattens as
(C, tp, p, p). Videos are split into chunks of at most `vision_segment_max_frames` temporal steps
(one `video_grid_thw` row each). Through the processor, video frames are *not* resized
(transformers' `MiniMaxM3VLProcessor.videos_kwargs = {"do_resize": False}`): frames must already be
multiples of 28 unless `resize_videos=True`.

Text: each `]<]image[>[` becomes VISION_START + IMAGE_TOKEN × (t·h·w / merge²) + VISION_END; each
`]<]video[>[` becomes, per temporal step, [`]<]{seconds:.1f} seconds[>[` when the video's fps is
known] + VISION_START + VIDEO_TOKEN × (h·w / merge²) + VISION_END. Then the text is tokenized.

Legend: x_CHW one image (uint8 or float32), frames_TCHW a clip, patches_ND N patches of
D = C·tp·p·p values, grid_thw (t, h, w) in patches.

Package rule: owns the input side (chat template, tokens, pixels, decoding, sample inputs); imports
nothing from the rest of ``m3_trt`` (transformers-free, torch + torchvision + tokenizers only).
"""

from m3_trt.processing.processor import (
    DEFAULT_MAX_INPUT_PIXELS,
    IMAGE_TOKEN,
    PLAIN_TEXT,
    VIDEO_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
    ImageDecodeError,
    ImageTooLargeError,
    IncrementalDecoder,
    M3Processor,
)
from m3_trt.processing.vision import (
    VisionPreprocessConfig,
    image_to_uint8_chw,
    patchify,
    preprocess_images,
    preprocess_videos,
    rescale_normalize,
    resize_bicubic,
    smart_resize,
    video_to_uint8_tchw,
)

__all__ = [
    "DEFAULT_MAX_INPUT_PIXELS", "IMAGE_TOKEN", "PLAIN_TEXT", "VIDEO_TOKEN", "VISION_END_TOKEN", "VISION_START_TOKEN",
    "ImageDecodeError", "ImageTooLargeError", "IncrementalDecoder", "M3Processor", "VisionPreprocessConfig",
    "image_to_uint8_chw", "patchify", "preprocess_images", "preprocess_videos", "rescale_normalize",
    "resize_bicubic", "smart_resize", "video_to_uint8_tchw",
]

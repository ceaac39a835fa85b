"""vision_encoder step of the GPU layout: grid -> engine inputs, then vision_tower -> vision_projector (BLS).

Runs only where the tensorrt_plan models load (a GPU host with Triton's TensorRT backend); it is not
exercised by the CPU test suite. Each image is one engine call (its patches are one attention
segment), so an image above the engines' profile (max_patches) is refused by name.
"""
import numpy as np
import torch
import triton_python_backend_utils as pb

from m3_trt.model.config import M3Config
from m3_trt.serving.triton_glue import error_response, model_parameters, read
from m3_trt.model.vision import vision_position_ids, vision_segment_ids

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _call(model, inputs, output):
    """One BLS request; torch tensors in and out through DLPack (bf16 has no numpy type)."""
    request = pb.InferenceRequest(model_name=model, requested_output_names=[output],
                                  inputs=[pb.Tensor.from_dlpack(k, v.contiguous()) for k, v in inputs.items()])
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return torch.from_dlpack(pb.get_output_tensor_by_name(response, output).to_dlpack())


class TritonPythonModel:
    def initialize(self, args):
        p = model_parameters(args)
        self.config = M3Config.from_pretrained(p["checkpoint"])
        self.dtype = DTYPES[p["engine_dtype"]]
        self.max_patches = int(p["max_patches"])
        self.merge = self.config.vision.spatial_merge_size

    def _embeds(self, pixels, grid):
        grid = torch.as_tensor(np.asarray(grid, np.int64)).reshape(-1, 3)
        pixels = torch.as_tensor(np.asarray(pixels, np.float32)).reshape(-1, pixels.shape[-1])
        out, start = [], 0
        for i, g in enumerate(grid):
            n = int(g.prod())
            if n > self.max_patches:
                raise ValueError(f"image {i} has {n} patches, over the vision engine's max_patches={self.max_patches}")
            g = g[None]
            feats = _call("vision_tower", {"pixel_values": pixels[start:start + n].to(self.dtype),
                                           "vision_pos": vision_position_ids(g, self.merge),
                                           "segment_ids": vision_segment_ids(g)}, "vision_feats")
            out.append(_call("vision_projector", {"vision_feats": feats}, "image_embeds").float().cpu())
            start += n
        if not out:
            return np.zeros((0, self.config.text.hidden_size), np.float32)
        return torch.cat(out).numpy()

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                e = self._embeds(read(pb, r, "pixel_values"), read(pb, r, "image_grid_thw"))
                responses.append(pb.InferenceResponse([pb.Tensor("image_embeds", e[None])]))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail its batch-mates
                responses.append(error_response(pb, exc))
        return responses

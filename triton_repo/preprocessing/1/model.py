"""preprocessing step: thin wrapper over m3_trt.serving.pipeline.Preprocessor (+ RequestLimits)."""
import numpy as np
import triton_python_backend_utils as pb

from m3_trt.serving.pipeline import Preprocessor, RequestError, RequestLimits
from m3_trt.serving.triton_glue import error_response, model_parameters, read_images, read_scalar, read_text


class TritonPythonModel:
    def initialize(self, args):
        p = model_parameters(args)
        self.pre = Preprocessor(p["checkpoint"], max_input_len=int(p["max_input_len"]),
                                max_input_pixels=int(p["max_input_pixels"]))
        self.limits = RequestLimits.from_parameters(p)

    def _one(self, request):
        prompt = read_text(pb, request, "text_input")
        max_tokens = read_scalar(pb, request, "max_tokens", ..., int)
        if max_tokens <= 0:
            raise RequestError(f"max_tokens must be > 0, got {max_tokens}")
        out = self.pre(prompt, read_images(pb, request, self.limits, prompt))
        return pb.InferenceResponse([
            pb.Tensor("input_ids", out["input_ids"][None]),
            pb.Tensor("pixel_values", out["pixel_values"][None]),
            pb.Tensor("image_grid_thw", out["image_grid_thw"][None]),
            pb.Tensor("request_output_len", np.array([[max_tokens]], np.int32)),
        ])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # noqa: BLE001 - answered per request, the model keeps serving
                responses.append(error_response(pb, exc))
        return responses

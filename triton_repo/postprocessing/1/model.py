"""postprocessing step: the ids window of one llm response -> its new text (m3_trt.serving.pipeline.text_delta).

The llm sends the new ids plus a short context (TokenWindow), so this step is stateless and its
work per response does not grow with the answer.
"""
import numpy as np
import triton_python_backend_utils as pb

from m3_trt.processing import M3Processor
from m3_trt.serving.pipeline import text_delta
from m3_trt.serving.triton_glue import error_response, model_parameters, read, read_scalar


class TritonPythonModel:
    def initialize(self, args):
        self.processor = M3Processor.from_pretrained(model_parameters(args)["checkpoint"])

    def _one(self, request):
        ids = read(pb, request, "output_ids").reshape(-1).tolist()
        text = text_delta(self.processor, ids, read_scalar(pb, request, "new_tokens", ..., int),
                          read_scalar(pb, request, "finished", ..., bool))
        return pb.InferenceResponse([pb.Tensor("text_output", np.array([[text.encode("utf-8")]], np.object_))])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as exc:  # noqa: BLE001
                responses.append(error_response(pb, exc))
        return responses

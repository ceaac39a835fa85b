"""llm step (decoupled): a token generator (torch or ONNX Runtime) per request, interleaved token by token."""
import numpy as np
import torch
import triton_python_backend_utils as pb

from m3_trt.serving.pipeline import load_steps
from m3_trt.serving.triton_glue import (InterleavedScheduler, error_response, model_parameters, read,
                                        read_scalar, sampling_params)

FINAL = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _response(ids, new_tokens, finished):
    return pb.InferenceResponse([
        pb.Tensor("output_ids", np.asarray(ids, np.int64)[None]),
        pb.Tensor("new_tokens", np.array([[new_tokens]], np.int32)),
        pb.Tensor("finished", np.array([[finished]], np.bool_)),
    ])


class TritonPythonModel:
    def initialize(self, args):
        p = model_parameters(args)
        torch.set_num_threads(int(p.get("torch_threads", "1")))
        _, self.generator = load_steps(p)
        self.scheduler = InterleavedScheduler("llm")

    def _submit(self, request):
        sender = request.get_response_sender()
        try:
            params = sampling_params(pb, request, max_tokens_name="request_output_len")
            stream = read_scalar(pb, request, "stream", False, bool)
            ids, embeds = read(pb, request, "input_ids"), read(pb, request, "image_embeds")
        except Exception as exc:  # noqa: BLE001
            sender.send(error_response(pb, exc), flags=FINAL)
            return
        tokens = []

        def emit(tok):
            tokens.append(tok)
            if stream:
                sender.send(_response(tokens, 1, False))

        def finish():
            sender.send(_response(tokens, 0 if stream else len(tokens), True), flags=FINAL)

        def fail(exc):
            sender.send(error_response(pb, exc), flags=FINAL)

        self.scheduler.submit(lambda: self.generator(ids, embeds, params), emit, finish, fail)

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None

    def finalize(self):
        self.scheduler.close()

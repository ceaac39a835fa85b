"""llm step (decoupled): in-flight batching over a KV-cache pool (m3_trt.serving.batching).

Each response carries a bounded window of ids (the new ones + a short context, TokenWindow) so a
streamed answer costs bytes linear in its length; postprocessing turns it into the new text.
"""
import numpy as np
import torch
import triton_python_backend_utils as pb

from m3_trt.serving.batching import GenRequest
from m3_trt.serving.pipeline import TokenWindow, load_steps
from m3_trt.serving.triton_glue import error_response, llm_scheduler, model_parameters, read, read_scalar, sampling_params

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
        _, generator = load_steps(p)
        self.scheduler = llm_scheduler(pb, args, generator)

    def _submit(self, request):
        sender = request.get_response_sender()
        try:
            params = sampling_params(pb, request, max_tokens_name="request_output_len")
            stream = read_scalar(pb, request, "stream", False, bool)
            ids, embeds = read(pb, request, "input_ids"), read(pb, request, "image_embeds", required=False)
        except Exception as exc:  # noqa: BLE001
            sender.send(error_response(pb, exc), flags=FINAL)
            return
        window, tokens = TokenWindow(), []

        def emit(tok):
            if stream:
                sender.send(_response(*window.push([tok]), False))
            else:
                tokens.append(tok)

        def finish(reason):
            if stream:
                sender.send(_response(*window.push([]), True), flags=FINAL)
            else:
                sender.send(_response(tokens, len(tokens), True), flags=FINAL)

        def fail(exc):
            sender.send(error_response(pb, exc), flags=FINAL)

        def cancelled():
            # the request's own flag; the sender's too where the stub has it (a closed stream)
            return request.is_cancelled() or (hasattr(sender, "is_cancelled") and sender.is_cancelled())

        self.scheduler.submit(GenRequest(ids, embeds, params, emit, finish, fail, cancelled=cancelled))

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None

    def finalize(self):
        self.scheduler.close()

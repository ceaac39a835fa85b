"""m3_bls (decoupled): preprocessing + BLS call to vision_encoder + generation + detokenisation."""
import numpy as np
import torch
import triton_python_backend_utils as pb

from m3_trt.serving.pipeline import Preprocessor, RequestError, load_steps, split_image_rows, text_delta
from m3_trt.serving.triton_glue import (InterleavedScheduler, error_response, model_parameters, read,
                                        read_scalar, read_text, sampling_params)

FINAL = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _text(piece):
    return pb.InferenceResponse([pb.Tensor("text_output", np.array([[piece.encode("utf-8")]], np.object_))])


class TritonPythonModel:
    def initialize(self, args):
        p = model_parameters(args)
        torch.set_num_threads(int(p.get("torch_threads", "1")))
        self.pre = Preprocessor(p["checkpoint"], max_input_len=int(p["max_input_len"]),
                                max_input_pixels=int(p["max_input_pixels"]))
        _, self.generator = load_steps(p)
        self.scheduler = InterleavedScheduler("m3_bls")

    def _image_embeds(self, enc):
        if not enc["image_grid_thw"].size:
            return None
        reply = pb.InferenceRequest(
            model_name="vision_encoder", requested_output_names=["image_embeds"],
            inputs=[pb.Tensor("pixel_values", enc["pixel_values"][None]),
                    pb.Tensor("image_grid_thw", enc["image_grid_thw"][None])],
        ).exec()
        if reply.has_error():
            raise RequestError(f"vision_encoder: {reply.error().message()}")
        return pb.get_output_tensor_by_name(reply, "image_embeds").as_numpy()[0]

    def _submit(self, request):
        sender = request.get_response_sender()
        try:
            prompt = read_text(pb, request, "text_input")
            params = sampling_params(pb, request)
            stream = read_scalar(pb, request, "stream", False, bool)
            rows = read(pb, request, "image_bytes_input", required=False)
            images = split_image_rows(rows) if rows is not None else []
        except Exception as exc:  # noqa: BLE001
            sender.send(error_response(pb, exc), flags=FINAL)
            return
        tokens = []

        def start():
            enc = self.pre(prompt, images)
            return self.generator(enc["input_ids"], self._image_embeds(enc), params)

        def emit(tok):
            tokens.append(tok)
            if stream:
                piece = text_delta(self.pre.processor, tokens, 1, False)
                if piece:
                    sender.send(_text(piece))

        def finish():
            last = text_delta(self.pre.processor, tokens, 0 if stream else len(tokens), True)
            sender.send(_text(last), flags=FINAL)

        def fail(exc):
            sender.send(error_response(pb, exc), flags=FINAL)

        self.scheduler.submit(start, emit, finish, fail)

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None

    def finalize(self):
        self.scheduler.close()

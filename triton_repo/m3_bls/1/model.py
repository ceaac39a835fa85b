"""m3_bls (decoupled): preprocessing + BLS call to vision_encoder + in-flight batched generation + detokenisation."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton_python_backend_utils as pb

from m3_trt.serving.batching import GenRequest
from m3_trt.serving.pipeline import Detokenizer, Preprocessor, RequestError, RequestLimits, load_steps
from m3_trt.serving.triton_glue import (error_response, llm_scheduler, model_parameters, read_images, read_scalar,
                                        read_text, sampling_params)

FINAL = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _text(piece):
    return pb.InferenceResponse([pb.Tensor("text_output", np.array([[piece.encode("utf-8")]], np.object_))])


class TritonPythonModel:
    def initialize(self, args):
        p = model_parameters(args)
        torch.set_num_threads(int(p.get("torch_threads", "1")))
        self.pre = Preprocessor(p["checkpoint"], max_input_len=int(p["max_input_len"]),
                                max_input_pixels=int(p["max_input_pixels"]))
        self.limits = RequestLimits.from_parameters(p)
        _, generator = load_steps(p)
        self.scheduler = llm_scheduler(pb, args, generator)
        # preprocessing + the vision call run off the execute thread, one request at a time
        self.prepare = ThreadPoolExecutor(1, thread_name_prefix="m3_bls-prepare")

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

        def fail(exc):
            sender.send(error_response(pb, exc), flags=FINAL)

        try:
            prompt = read_text(pb, request, "text_input")
            params = sampling_params(pb, request)
            stream = read_scalar(pb, request, "stream", False, bool)
            images = read_images(pb, request, self.limits, prompt)
        except Exception as exc:  # noqa: BLE001
            fail(exc)
            return
        detok = Detokenizer(self.pre.processor)
        tokens = []

        def emit(tok):
            if stream:
                piece = detok.push([tok])
                if piece:
                    sender.send(_text(piece))
            else:
                tokens.append(tok)

        def finish(reason):
            sender.send(_text(detok.push([], finished=True) if stream else self.pre.processor.decode(tokens)),
                        flags=FINAL)

        def prepare():
            try:
                if request.is_cancelled():
                    finish("cancelled")
                    return
                enc = self.pre(prompt, images)
                self.scheduler.submit(GenRequest(enc["input_ids"], self._image_embeds(enc), params, emit, finish,
                                                 fail, cancelled=request.is_cancelled))
            except Exception as exc:  # noqa: BLE001
                fail(exc)

        self.prepare.submit(prepare)

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None

    def finalize(self):
        self.prepare.shutdown(wait=True, cancel_futures=True)
        self.scheduler.close()

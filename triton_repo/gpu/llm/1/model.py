"""llm step of the GPU layout: TensorRT-LLM's LLM API over the build's handoff options (model.yaml).

Runs only on a GPU host with TensorRT-LLM installed (never on the CPU machines this project is
tested on). model.yaml is the build's ``trtllm/triton/tensorrt_llm/1/model.yaml``: every key but
``triton_config`` goes to ``tensorrt_llm.LLM(**args)`` as TensorRT-LLM's own ``llmapi`` Triton model
does. Each request is a TokensPrompt (our preprocessing's ids; image embeddings from the vision
engines as ``multimodal_embeddings``) submitted with ``generate_async``; TensorRT-LLM batches in
flight. Streamed responses carry only the new text (``text_diff``); the last one is final.
"""
import threading
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb
import yaml

from m3_trt.serving.triton_glue import error_response, read, read_scalar, sampling_params

FINAL = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _text(text):
    return pb.InferenceResponse([pb.Tensor("text_output", np.array([[text.encode("utf-8")]], np.object_))])


class TritonPythonModel:
    def initialize(self, args):
        from tensorrt_llm import LLM  # lazily: only a GPU host has it

        options = yaml.safe_load((Path(__file__).parent / "model.yaml").read_text())
        options.pop("triton_config", None)
        self.llm = LLM(**options)

    def _run(self, request, sender):
        from tensorrt_llm import SamplingParams

        try:
            p = sampling_params(pb, request, max_tokens_name="request_output_len")
            stream = read_scalar(pb, request, "stream", False, bool)
            ids = read(pb, request, "input_ids").reshape(-1).tolist()
            embeds = read(pb, request, "image_embeds")
            prompt = {"prompt_token_ids": ids}
            if embeds is not None and embeds.size:
                prompt["multimodal_embeddings"] = {"image": [torch.from_numpy(embeds.reshape(-1, embeds.shape[-1]))]}
            kw = dict(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed)
            if p.top_k:
                kw["top_k"] = p.top_k
            if p.end_id is not None:
                kw["end_id"] = p.end_id
            result = self.llm.generate_async(prompt, sampling_params=SamplingParams(**kw), streaming=stream)
            if stream:
                for out in result:
                    if request.is_cancelled():
                        result.abort()
                        break
                    if out.outputs[0].text_diff:
                        sender.send(_text(out.outputs[0].text_diff))
                sender.send(flags=FINAL)
            else:
                sender.send(_text(result.result().outputs[0].text), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - the error goes to this request's client
            sender.send(error_response(pb, exc), flags=FINAL)

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._run, args=(request, request.get_response_sender()), daemon=True).start()
        return None

    def finalize(self):
        self.llm.shutdown()

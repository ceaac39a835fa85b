"""vision_encoder step: all requests of a dynamic batch in one VisionEncoder forward (torch or ONNX Runtime)."""
import torch
import triton_python_backend_utils as pb

from m3_trt.serving.pipeline import load_steps
from m3_trt.serving.triton_glue import error_response, model_parameters, read, vision_batch_metric


class TritonPythonModel:
    def initialize(self, args):
        p = model_parameters(args)
        torch.set_num_threads(int(p.get("torch_threads", "1")))
        self.encoder, _ = load_steps(p)
        self.batch_sizes = vision_batch_metric(pb, args)

    def execute(self, requests):
        batch = [(read(pb, r, "pixel_values"), read(pb, r, "image_grid_thw")) for r in requests]
        self.batch_sizes.observe(len(batch))
        try:
            embeds = self.encoder(batch)
        except Exception:  # noqa: BLE001 - one bad request must not fail its batch-mates
            embeds = []
            for item in batch:
                try:
                    embeds.append(self.encoder([item])[0])
                except Exception as exc:  # noqa: BLE001
                    embeds.append(exc)
        return [error_response(pb, e) if isinstance(e, BaseException)
                else pb.InferenceResponse([pb.Tensor("image_embeds", e[None])]) for e in embeds]

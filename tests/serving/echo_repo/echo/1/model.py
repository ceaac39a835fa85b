"""Echo fixture: text_output = text_input + " | torch <version>" [+ " | images <byte counts>"].

"fail:<msg>" answers an error response with <msg>, so tests can see error propagation.
"""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import torch  # the point of the fixture: the venv's torch imports inside the stub

        self.suffix = f" | torch {torch.__version__}"

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
            if text.startswith("fail:"):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(text[5:])))
                continue
            text += self.suffix
            images = pb_utils.get_input_tensor_by_name(request, "image_bytes_input")
            if images is not None:
                rows = images.as_numpy().reshape(-1, images.as_numpy().shape[-1])
                sizes = [len(r.tobytes().rstrip(b"\0")) for r in rows]
                text += f" | images {sizes}"
            out = np.array([[text.encode()]], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", out)]))
        return responses

"""Streaming echo fixture: one response per whitespace-separated word (with its leading space)."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
            if text.startswith("fail:"):
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(text[5:])),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            for i, word in enumerate(text.split(" ")):
                piece = word if i == 0 else " " + word
                out = pb_utils.Tensor("text_output", np.array([[piece.encode()]], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse([out]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

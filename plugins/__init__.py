"""Custom operators of m3-trt, one folder each (installed as ``m3_trt.plugins``).

Every folder holds the plain torch reference (the spec), the Triton-language kernel, the
``torch.library`` custom op that ``torch.export`` sees as one node, and its ONNX / TensorRT parts.
"""

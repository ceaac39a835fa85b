"""Custom operators of m3-trt, one folder each (installed as ``m3_trt.plugins``).

Every folder holds the operator's contract (``contract.py``: inputs with layouts and dtypes,
attributes with defaults, the one output-shape rule), the plain torch reference (the spec), the
torch and Triton implementations, ``op.py`` (the ``IMPLS`` table and the ``torch.library`` op
generated from the contract) and, in ``__init__``, the public checking dispatcher and its
``OPERATOR`` registry entry. ``registry.py`` lists the operators; ``onnx_ops.py`` (ONNX schema,
exporter translation, ONNX Runtime kernel) and ``m3_trt.export.tensorrt.plugins`` (TensorRT
creators) are derived from the contracts by iterating over it.

Imports: torch only (plus Triton, onnx, onnxruntime lazily where they are used); nothing from
the rest of ``m3_trt``.
"""

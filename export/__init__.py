"""Exporters (installed as ``m3_trt.export``): ONNX per component and per rank, TensorRT engines and
networks, the TensorRT-LLM handoff.

Owns: ``onnx/`` (specs, exporter, per-rank split graphs in ``ranks``, FP8 Q/DQ, ONNX Runtime
sessions, verification), ``tensorrt/`` (engine builder, network-API route, plugin creators derived
from the operator contracts), ``tensorrt_build`` (engines for an export folder), ``trtllm``
(launch options for TensorRT-LLM's PyTorch backend), ``cli`` (the ``export`` command).

May import: ``m3_trt.model``, ``m3_trt.processing``, ``m3_trt.quant``, ``m3_trt.checkpoints``,
``m3_trt.plugins`` and the root modules; never ``build``, ``runtime``, ``serving``, ``compare`` or
``cli`` (the build passes targets and layouts in as values). Importing the package imports nothing.
"""

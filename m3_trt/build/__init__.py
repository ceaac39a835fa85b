"""``build-engine``: targets, the plan, and the build that turns a checkpoint into per-rank artifacts.

Owns: ``targets`` (engines/*.toml → Target), ``plan`` (ranks, per-rank memory, host memory for N
workers), ``builder`` (the build: journal, resume, pieces → rank weights → graphs → engines →
handoff), ``rank_weights`` (streaming per-rank weight writer), ``weights_file`` (a safetensors file
written tensor by tensor), ``cli`` (the command).

May import: ``m3_trt.model``, ``m3_trt.quant``, ``m3_trt.processing``, ``m3_trt.export`` (ONNX and
TensorRT exporters, TensorRT-LLM handoff), ``m3_trt.plugins``, the root modules. Not runtime,
serving, compare or cli. Importing the package itself imports nothing.
"""

"""FP8: emulation and calibration, encoders, and the ``quantize`` command.

Owns: ``fp8`` (which weights are FP8, E4M3 quantize/dequantize, the emulated FP8 model, whole-model
and layer-by-layer calibration), ``encode`` (streaming per-channel E4M3 conversion of safetensors
shards), ``quantize`` (a bf16 checkpoint → MXFP8 / FP8-block checkpoint that transformers loads).

May import: ``m3_trt.model``, ``m3_trt.processing`` (calibration prompts), ``m3_trt.plugins``, the root
modules. Importing the package itself imports nothing.
"""

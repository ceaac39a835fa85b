"""Exporters: ONNX per component, TensorRT networks, TensorRT-LLM handoff (installed as ``m3_trt.export``)."""

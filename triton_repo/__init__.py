"""Triton model-repository templates as package data (``m3_trt.triton_repo``): config.pbtxt + model.py per step."""

"""Checkpoints the project writes itself: ``tiny`` (the embedded default, with ``tiny_tokenizer``)
and ``synthetic`` (the real on-disk layout at any size, random weights, bf16 or MXFP8).

May import: ``m3_trt.model``, ``m3_trt.quant``, the root modules. Importing the package imports nothing.
"""

"""The torch reference of MiniMax-M3-VL and everything needed to read a checkpoint into it.

Owns: ``config`` (M3Config from config.json, validation), ``checkpoint`` (safetensors reading, dtype
and FP8 checks), ``cache`` (static KV cache), ``modeling`` (the decoder, ``DTYPES``), ``vision`` (vision
tower + projector), ``pieces`` (the checkpoint streamed piece by piece), ``generate`` (sampling loop),
``shard`` (the tensor/expert-parallel split rule), ``rank`` (one rank's slice of the reference),
``params`` (parameter counts).

May import: ``m3_trt.plugins`` and the root modules (``outputs``, ``tolerances``). Nothing above it.
Importing the package itself imports nothing.
"""

"""Triton serving for M3-VL: repository generator, server launcher, gRPC client.

Modules: ``repository`` (write_repository), ``server`` (TritonServer, serve), ``client``
(M3Client), ``pipeline`` (the steps as library code), ``triton_glue`` (python-backend helpers),
``cli`` (command functions), ``openai_server`` (the OpenAI-compatible endpoint), ``tensorrt_repo``
(the GPU layout), ``pbtxt`` (escaped config templates). Nothing is imported here, so importing the package is free.

May import: ``model``, ``processing``, ``quant``, ``export`` (ONNX Runtime sessions), ``build``
(reading a build's manifest), ``runtime`` and the root modules; never ``compare`` or ``cli``.
"""

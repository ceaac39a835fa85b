"""``m3-trt compare``: every backend against the torch reference, layer by layer and end to end.

Modules: ``inputs`` (prompt set → model inputs), ``backends`` (one class per backend, one
protocol), ``intercept`` (records the reference's indexer choices by wrapping its plugin
dispatch), ``metrics``, ``tolerances`` (one budget per (backend, dtype)),
``runner`` (measure + judge → report dict), ``report`` (table, JSON, PNG), ``cli``; the streamed
path of backends that run layer by layer: ``sides`` (torch / ONNX Runtime, one piece at a time),
``walk`` (reference layer i and backend layer i on the same inputs, isolated and cumulative),
``streamed`` (``compare --layers``) and ``few_layers`` (``--first-layers N``).
Nothing is imported at package import time.

May import: everything below it in the pipeline (``model`` … ``serving``: the backends it compares);
never ``cli``.
"""

"""``m3-trt compare``: every backend against the torch reference, layer by layer and end to end.

Modules: ``inputs`` (prompt set → model inputs), ``backends`` (one class per backend, one
protocol), ``intercept`` (records the reference's indexer choices by wrapping its plugin
dispatch), ``metrics``, ``tolerances`` (one budget per (backend, dtype)),
``runner`` (measure + judge → report dict), ``report`` (table, JSON, PNG), ``cli``.
Nothing is imported at package import time.
"""

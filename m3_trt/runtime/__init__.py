"""Running a build: sharded execution of the reference on a ``build-engine`` output, and of its per-rank ONNX graphs.

Owns: ``load`` (``load_rank(build_dir, rank)`` → a :class:`m3_trt.model.rank.RankModel` on the rank's
weights), ``run`` (``generate_sharded``: greedy tokens from every rank, spawned processes or
``torchrun -m m3_trt.runtime.run``), ``dist`` (process-group set-up), ``onnx_ranks`` (every rank's
ONNX graphs in ONNX Runtime, partial sums all-reduced on the host).

May import: ``m3_trt.model``, ``m3_trt.quant``, ``m3_trt.export`` (ONNX Runtime sessions), the root
modules. Not build, serving, compare or cli. Importing the package itself imports nothing.
"""

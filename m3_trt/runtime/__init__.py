"""Sharded execution of the reference model: one process per rank, torch.distributed collectives.

``RankModel`` (one rank's slice, the reference's own blocks), ``Layout`` (tp/ep split),
``load_rank(build_dir, rank)`` (a ``build-engine`` output), ``generate_sharded`` (greedy tokens
from every rank of a build, launched with ``spawn``; ``python -m m3_trt.runtime.run`` under torchrun).
"""

from .model import RankModel, load_rank, local_text_config
from .run import generate_sharded
from .shard import Layout, shard_state, shard_tensor

__all__ = ["Layout", "RankModel", "generate_sharded", "load_rank", "local_text_config", "shard_state",
           "shard_tensor"]

"""The operators of m3-trt, by name: the one list that the ONNX side (``onnx_ops.py``), the
TensorRT creators (``export/tensorrt/plugins.py``) and the model's dispatch (``m3_trt.model.modeling``)
iterate over. A new operator is a new folder (contract, reference, implementations, ``op.py``,
``OPERATOR`` in its ``__init__``) plus one line here.
"""

from __future__ import annotations

from . import block_sparse_attention, indexer_topk, swiglu_moe
from ._contract import Operator

OPERATORS: dict[str, Operator] = {
    op.contract.name: op
    for op in (
        indexer_topk.OPERATOR,
        block_sparse_attention.OPERATOR,
        swiglu_moe.OPERATOR,
    )
}

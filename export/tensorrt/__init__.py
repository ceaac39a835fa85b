"""TensorRT side of the export: engines from ONNX (parser route), networks written layer by
layer (native LLM layers), and IPluginV3 creators for the M3 custom ops.

Works with the standard ``tensorrt`` package where installed and with TensorRT-RTX
(``tensorrt_rtx_bindings``) otherwise; nothing imports TensorRT until a function needs it.
What TensorRT-RTX 1.7.1 can and cannot do on a CPU-only machine is in docs/tensorrt_rtx.md.
"""

from m3_trt.export.tensorrt._trt import TensorRTUnavailable, backend_name, import_trt, trt_available, trt_unavailable_reason
from m3_trt.export.tensorrt.builder import BuildReport, TensorInfo, build_engine_from_onnx, try_deserialize
from m3_trt.export.tensorrt.subprocess_build import build_in_subprocess

__all__ = [
    "BuildReport",
    "TensorInfo",
    "TensorRTUnavailable",
    "backend_name",
    "build_engine_from_onnx",
    "build_in_subprocess",
    "import_trt",
    "trt_available",
    "trt_unavailable_reason",
    "try_deserialize",
]

"""ONNX export per component (``m3_trt.export.onnx``): ``export_model`` and the ONNX Runtime chain."""

from m3_trt.export.onnx.exporter import export_model, export_spec
from m3_trt.export.onnx.specs import DTYPES, OPSET, PLUGIN_MODES, ExportOptions, Spec

__all__ = ["DTYPES", "OPSET", "PLUGIN_MODES", "ExportOptions", "Spec", "export_model", "export_spec"]

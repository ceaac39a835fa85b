"""ONNX export per component (``m3_trt.export.onnx``): ``export_model`` and the ONNX Runtime chain."""

from .exporter import DTYPES, OPSET, PLUGIN_MODES, ExportOptions, export_model

__all__ = ["DTYPES", "OPSET", "PLUGIN_MODES", "ExportOptions", "export_model"]

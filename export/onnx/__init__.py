"""ONNX export per component (``m3_trt.export.onnx``): ``export_model`` and the ONNX Runtime chain."""

from .exporter import DTYPES, OPSET, PLUGIN_MODES, ExportOptions, Spec, export_model, export_spec

__all__ = ["DTYPES", "OPSET", "PLUGIN_MODES", "ExportOptions", "Spec", "export_model", "export_spec"]

"""Build targets as package data (``m3_trt.engines``): one TOML file per target, read with importlib.resources."""

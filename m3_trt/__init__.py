"""m3-trt: export and deployment toolkit for MiniMax-M3-VL."""

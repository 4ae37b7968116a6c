"""Lowering a checkpoint to ONNX (window and stream modes), precision passes, engines."""

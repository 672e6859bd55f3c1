"""Checkpoint -> device bundle (TFLite / ONNX / ExecuTorch) with verified parity."""

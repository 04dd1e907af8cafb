"""Export to ONNX and TensorRT, and the runtime that loads any of them."""

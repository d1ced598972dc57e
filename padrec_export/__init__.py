"""padrec exporter: PyTorch models, reference decoding, training, ONNX export and TensorRT engine build."""

"""Target classifiers: torch training, ONNX export with model.json, onnxruntime runner."""

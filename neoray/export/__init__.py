"""Trained detectors in deployment formats: ``onnx`` writes one ONNX file whose contract is ``neoray
predict``'s, checked against PyTorch with onnxruntime before it is written (``neoray export``)."""

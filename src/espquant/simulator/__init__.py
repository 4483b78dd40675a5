"""The simulator: ESP-DL's integer arithmetic per target chip, fed from ONNX + table or from a ``.espdl``."""

"""mpqc: a mixed-precision quantization compiler for PyTorch."""

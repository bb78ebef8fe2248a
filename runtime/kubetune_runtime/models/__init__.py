"""Models: load base models (dtype, quantization), build adapters, tiny test models."""

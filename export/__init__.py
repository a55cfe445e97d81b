"""Exporters: quantization recipes, one module per backend, the bundle and its manifest, parity."""

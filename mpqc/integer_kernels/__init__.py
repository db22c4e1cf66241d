"""Integer kernels of transformer ops (placeholder docstring)."""

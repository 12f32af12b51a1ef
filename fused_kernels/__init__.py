"""Fused GPU kernels (Triton) with their plain-torch references."""

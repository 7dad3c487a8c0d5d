"""Compilation: loss programs to generated modules (a fused Triton kernel and its torch twin)."""

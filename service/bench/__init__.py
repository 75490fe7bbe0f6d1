"""Benchmarks (CPU engine, GPU, HTTP serving, tensor-parallel sweep), the soak run, and saved results."""

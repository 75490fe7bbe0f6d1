"""Megatron-style tensor-parallel building blocks: layers, collectives, sharded loading, quantization."""

QUANTIZATIONS = ("none", "int8", "int4")  # weight forms after loading (parallel.quant); torch-free for the CLI

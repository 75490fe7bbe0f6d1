"""The weight forms a model can take after loading (`--quantize`); torch-free, so the CLI can list them
without importing torch. `parallel.quant` builds them."""

QUANTIZATIONS = ("none", "int8", "int4")

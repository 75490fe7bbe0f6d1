"""The weight forms a model can take after loading (`--quantize`); torch-free, so the CLI can list them
without importing torch. `parallel.quant` builds them."""

QUANTIZATIONS = ("auto", "none", "int8", "int4")  # auto: `model.loader.pick_quantization`

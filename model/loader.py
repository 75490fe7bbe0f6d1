"""Build a model from a local Hugging Face-format directory (config.json + safetensors).

The network is built on the meta device, then each rank reads only its slice of every tensor
(`parallel.weights`). Pickle checkpoints (`*.bin`, `*.pt`) are refused: loading them can run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from model.config import ModelConfig
from model.cpu_matmul import pack
from model.gpt2 import GPT2LMHeadModel
from model.kernels import load as load_kernels
from model.llama import LlamaForCausalLM
from parallel.forms import QUANTIZATIONS
from parallel.state import get_tp
from parallel.stored import finish, quantize
from parallel.weights import SUFFIXES, SafetensorsReader, load_into

FAMILIES = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}


def read_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def check_weights(directory: Path) -> None:
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickles:
        raise ValueError(
            f"{directory} holds only pickle checkpoints ({', '.join(pickles[:3])}); they are refused "
            "because loading pickle can run code. Convert them to safetensors first."
        )
    raise FileNotFoundError(f"no *.safetensors weights in {directory}")


def pick_quantization(directory: str | Path, device: torch.device | str = "cpu") -> str:
    """What `--quantize auto` means for the checkpoint in `directory`: "int4" on a CPU when it stores
    tensors quantized (a GGUF file's blocks: they run as stored, the 5-6 bit ones as int8/int6, instead of
    dequantized to four or eight times their bytes), else "none" (as loaded, and on CUDA)."""
    if torch.device(device).type != "cpu":
        return "none"
    reader = SafetensorsReader(Path(directory))
    try:
        stored = tuple(suffixes[0] for suffixes in SUFFIXES.values())  # "_int4", "_int8"
        return "int4" if any(key.endswith(stored) for key in reader.keys()) else "none"
    finally:
        reader.close()


def load_model(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantization: str = "none",
) -> nn.Module:
    """Load this rank's shard of the model in `directory` (at tensor-parallel size 1, all of it), its
    linear layers quantized after loading with `quantization` int8 or int4 (`parallel.stored`); weights
    stored quantized are dequantized to `dtype` for "none"; "auto" is `pick_quantization`. On a CPU,
    quantized layers run our kernels where they can (`model.kernels`, built on first use; with fp32
    activations the norms, rotary, short rows' attention and SwiGLU run them too, or whole blocks in one call
    where all their matmuls do: `native_step`), and fp32 linear layers take our kernel's or
    oneDNN's packed weights where that measures faster (`model.cpu_matmul`; the routes in
    `model.matmul_routes`)."""
    directory = Path(directory)
    cfg = read_config(directory)
    cfg.check_tp(get_tp().size)
    check_weights(directory)
    with torch.device("meta"):
        model = FAMILIES[cfg.arch](cfg)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantize {quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "auto":
        quantization = pick_quantization(directory, device)
    isa = native = None  # our kernels' instruction set; where the step around the matmuls runs them (fp32)
    if torch.device(device).type == "cpu" and (quantization != "none" or dtype == torch.float32):
        isa = load_kernels()
        native = isa if dtype == torch.float32 else None
    sources = {model.get_submodule(key.rpartition(".")[0]) for key in model.tied_keys.values()}

    def loaded(layer: nn.Module) -> None:  # quantize as we go, except a tied weight's owner (below)
        if layer not in sources:
            finish(layer, quantization, dtype)

    reader = SafetensorsReader(directory)
    try:
        load_into(model, reader, dtype, device, set(model.tied_keys), _key_mapper(cfg, reader.keys()), loaded)
    finally:
        reader.close()
    for tied, source in model.tied_keys.items():
        owner, _, leaf = tied.rpartition(".")
        source_owner = model.get_submodule(source.rpartition(".")[0])
        if hasattr(source_owner, "stored"):  # tied to a quantized embedding: the head takes the same form
            form, parts = source_owner.stored
            model.get_submodule(owner).stored = (form, dict(parts))  # its own dict: `from_stored` may take from it
            delattr(model.get_submodule(owner), leaf)
        else:
            setattr(model.get_submodule(owner), leaf, model.get_parameter(source))
    model.init_buffers(device, dtype)
    quantize(model, quantization, dtype).eval()
    use_native_step(model, native)
    model.matmul_routes = pack(model, isa) if torch.device(device).type == "cpu" else {}
    return model


def use_native_step(model: nn.Module, isa: str | None) -> None:
    """Run the norms, rotary, short rows' attention and SwiGLU of `model` (the modules that have a
    `native_step`; a block whose matmuls all run our kernels, in one call) in our kernels with instruction
    set `isa`, or (None) in torch's ops."""
    for module in model.modules():
        if hasattr(type(module), "native_step"):
            module.native_step = isa


def _key_mapper(cfg: ModelConfig, keys: set[str]):
    """GPT-2 checkpoints saved from `GPT2Model` lack the `transformer.` prefix."""
    if cfg.arch == "gpt2" and "transformer.wte.weight" not in keys and "wte.weight" in keys:
        return lambda name: name.removeprefix("transformer.")
    return lambda name: name


def transformers_model(directory: str | Path) -> nn.Module:
    """`transformers`' own model on the same weights, in fp32, for parity checks and benchmarks: the
    checkpoint as it is, with the tensors stored quantized (`model.gguf_quant`) dequantized as ours are."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from parallel.stored import dequantize
    from parallel.weights import SUFFIXES

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for key, t in tensors.items():
        form = next((f for f, suffixes in SUFFIXES.items() if key.endswith(suffixes[0])), None)
        if form is not None:
            base = key.removesuffix(SUFFIXES[form][0])
            state[base] = dequantize(form, {s: tensors[base + s] for s in SUFFIXES[form]})
        elif not key.endswith(("_scale", "_low")):
            state[key] = t.float()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(directory)), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"transformers' model does not match {directory}: missing {missing}, unexpected {unexpected}")
    return model.eval()

"""oneDNN's and our kernel's packed fp32 weights (`model.cpu_matmul`): the same products as `F.linear`,
chosen per shape by timing, and never applied where they do not belong (quantized or bf16 layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from model import kernels
from model.cpu_matmul import DenseLinear, PackedLinear, pack
from model.loader import load_model
from model.registry import resolve
from parallel.quant import weight_bytes
from service.engine.core import Engine
from service.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("shape", [(1, 1, 96), (8, 96), (3, 5, 96), (512, 96)])
def test_packed_linear_equals_f_linear(shape):
    """One row (decode), several (a batch), a (B, T) prompt chunk and a long one: the packed layout is
    chosen for 64 rows and must serve every row count; our kernel's the same on every instruction set."""
    w, x = torch.randn(200, 96), torch.randn(shape)
    assert_close(PackedLinear(w)(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    if kernels.load() is not None:
        for isa in torch.ops.nlg.isas():
            assert_close(DenseLinear(w, isa)(x), F.linear(x, w), rtol=1e-5, atol=1e-4, msg=isa)


def test_pack_measures_each_shape_and_keeps_the_greedy_tokens():
    """Timed per shape: each shape's layers all take the route chosen for it (a layer keeping its weight
    and a packed kernel both would read the weights twice), the bytes a step reads stay the same, and the
    greedy tokens do not change."""
    path = resolve("tiny-random")
    plain, timed = load_model(path), load_model(path)
    assert pack(plain, min_bytes=1 << 40) == {}  # nothing is that large: F.linear everywhere
    layers = [m for m in timed.modules() if getattr(m, "quantizable", False)]
    shapes = {m: tuple(m.weight.shape) for m in layers}
    routes = pack(timed, kernels.load(), min_bytes=0)
    assert set(shapes.values()) == set(routes)
    for m in layers:
        assert hasattr(m, "kernel") == (routes[shapes[m]] != "mkl") != hasattr(m, "weight")
        if hasattr(m, "kernel"):
            assert isinstance(m.kernel, PackedLinear if routes[shapes[m]] == "onednn" else DenseLinear)
    assert weight_bytes(timed) == weight_bytes(plain)
    prompts, params = [[5, 17, 42, 99, 3], [200, 1]], [SamplingParams(max_tokens=16)] * 2
    want = [c.token_ids for c in Engine(plain).generate(prompts, params)]
    assert [c.token_ids for c in Engine(timed).generate(prompts, params)] == want


@pytest.mark.parametrize("form", ["int8", "bf16"])
def test_pack_leaves_quantized_and_bf16_layers_alone(form):
    """Only fp32 weights are packed: an int8 layer has its own kernel, and bf16 packing needs AVX-512."""
    path = resolve("tiny-random")
    model = load_model(path, quantization="int8") if form == "int8" else load_model(path, dtype=torch.bfloat16)
    assert pack(model, kernels.load(), min_bytes=0, force="ours") == {}


@pytest.mark.parametrize("route", ["onednn", "ours"])
def test_every_route_keeps_the_greedy_tokens(route):
    """Each route forced on every fp32 layer (the timing picks per machine and shape): the model's greedy
    tokens as F.linear's, its logits within float rounding."""
    if route == "ours" and kernels.load() is None:
        pytest.skip("our kernels are not built")
    path = resolve("tiny-random")
    plain, routed = load_model(path), load_model(path)
    pack(plain, min_bytes=1 << 40)
    assert set(pack(routed, kernels.load(), min_bytes=0, force=route).values()) == {route}
    ids, positions = torch.tensor([[5, 17, 42, 99, 3, 200, 1]]), torch.arange(7)[None]
    with torch.inference_mode():
        assert_close(routed(ids, positions), plain(ids, positions), rtol=1e-4, atol=1e-4)
    prompts, params = [[5, 17, 42, 99, 3], [200, 1]], [SamplingParams(max_tokens=16)] * 2
    want = [c.token_ids for c in Engine(plain).generate(prompts, params)]
    assert [c.token_ids for c in Engine(routed).generate(prompts, params)] == want


def test_a_packed_model_deep_copies():
    """`copy.deepcopy` of a packed model (an opaque oneDNN tensor has no storage to copy) gives an
    independent copy with the same outputs."""
    import copy

    model = load_model(resolve("tiny-random"))
    pack(model, min_bytes=0, force="onednn")
    twin = copy.deepcopy(model)
    ids, positions = torch.tensor([[5, 17, 42]]), torch.arange(3)[None]
    with torch.inference_mode():
        assert_close(twin(ids, positions), model(ids, positions))
    assert twin.lm_head.kernel.packed is not model.lm_head.kernel.packed

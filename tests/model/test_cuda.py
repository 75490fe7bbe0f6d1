"""The same model on CUDA (bf16) and on the CPU (fp32): skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from model.loader import load_model
from model.registry import resolve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_bf16_matches_cpu_fp32():
    """Guards device placement of every parameter and buffer (RoPE tables, KV cache) and bf16 numerics."""
    from service.engine.core import Engine
    from service.engine.sampling_params import SamplingParams

    path = resolve("tiny-random")
    cpu = load_model(path)
    gpu = load_model(path, dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11]])
    positions = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        want = cpu(ids, positions)
        got = gpu(ids.cuda(), positions.cuda()).float().cpu()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    params = [SamplingParams(max_tokens=16, ignore_eos=True)]
    a = Engine(cpu).generate([ids[0].tolist()], params)[0].token_ids
    b = Engine(gpu, device="cuda").generate([ids[0].tolist()], params)[0].token_ids
    assert a[:4] == b[:4]  # bf16 may drift later on a random model; the first steps must agree


def test_cuda_graph_decode_matches_cpu():
    """Decode replayed from CUDA graphs of several row buckets, with slots freed and refilled while others
    run: fp32 greedy tokens equal the CPU's, and equal the GPU's eager decode."""
    from service.engine.core import Engine
    from service.engine.sampling_params import SamplingParams

    path = resolve("tiny-random")
    prompts = [[5, 17, 42], [9] * 30, [200, 201, 202, 203], [64] * 7, [1]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 20, 9, 24, 30)]
    want = [c.token_ids for c in Engine(load_model(path), max_batch=3).generate(prompts, params)]
    gpu = load_model(path, device="cuda")
    graphs = Engine(gpu, max_batch=3, device="cuda")
    assert [c.token_ids for c in graphs.generate(prompts, params)] == want
    assert len(graphs.runner.graphs.graphs) >= 2
    eager = Engine(gpu, max_batch=3, device="cuda", graphs=False)
    assert [c.token_ids for c in eager.generate(prompts, params)] == want


def test_cuda_warm_up_then_steps_launched_ahead_match_cpu():
    """Graphs captured before any request (as `nlg serve` does), then greedy steps launched ahead of the
    host with one sequence stopped early by its callback: the CPU's tokens, nothing past the stop."""
    from service.engine.core import Engine
    from service.engine.sampling_params import SamplingParams
    from service.engine.sequence import Sequence

    path = resolve("tiny-random")
    prompts = [[5, 17, 42], [9] * 30, [200, 201, 202, 203]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 20, 9)]
    want = [c.token_ids for c in Engine(load_model(path), max_batch=4).generate(prompts, params)]
    engine = Engine(load_model(path, device="cuda"), max_batch=4, device="cuda", context=512)
    cache = engine.runner.new_cache(4, 300)
    warmed = engine.runner.warm_up(cache, 4)
    assert len(warmed) == len(engine.runner.graphs.graphs) == 6  # rows 1, 2, 4 at spans 256, 512
    engine.use(cache, 4)
    seqs = [Sequence(p, sp) for p, sp in zip(prompts, params)]
    taken = []

    def five(out):  # stops the first sequence at its fifth token
        for k, t in enumerate(out.token_ids):
            taken.append(t)
            if len(taken) == 5:
                return k + 1
        return None

    seqs[0].on_output = five
    assert [c.token_ids for c in engine.run(seqs)] == [want[0][:5]] + want[1:]

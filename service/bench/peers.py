"""Other CPU engines on the same weights, for `nlg bench --peers`: llama.cpp (an F32 GGUF made from the
same GGUF file), CTranslate2 and ONNX Runtime GenAI (both converted from the checkpoint `transformers`
loads, `model.loader.transformers_model`). Each is optional (the `bench` extra); an engine that is not
installed is skipped. Conversions are made once, under the model cache.

Every engine decodes greedily with the process's threads: the first prompt alone (its decode rate
excludes the first token, the prompt's evaluation) and, where the engine batches, all prompts at once
(tokens / wall time, prefill included, as for our batch-8 row). The caller compares the tokens.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.registry import cache_dir

PEERS = ("llama_cpp", "ctranslate2", "onnxruntime_genai")


def installed() -> list[str]:
    return [p for p in PEERS if importlib.util.find_spec(p) is not None]


def _made(path: Path, make) -> Path:
    """`path`, made by `make(tmp)` once: built aside, then renamed."""
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        make(tmp)
        tmp.rename(path)
    return path


def f32_gguf(source: Path) -> Path:
    """`source` with every tensor dequantized to F32 and `general.file_type` F32: the weights our fp32 path
    runs (ours dequantize the same blocks), in llama.cpp's own layout and metadata."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    def make(tmp: Path) -> None:
        reader = GGUFReader(source)
        arch = reader.fields["general.architecture"].contents()
        writer = GGUFWriter(tmp, arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)
        writer.add_file_type(0)  # all F32
        for t in reader.tensors:
            shape = [int(x) for x in reversed(t.shape)]
            data = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
            writer.add_tensor(t.name, data, raw_dtype=GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _made(cache_dir() / "bench" / f"{source.stem}-f32.gguf", make)


def hf_export(directory: Path, name: str) -> Path:
    """The checkpoint as `transformers` saves it (stored quantized forms dequantized), with the tokenizer."""
    from model.loader import transformers_model

    def make(tmp: Path) -> None:
        transformers_model(directory).save_pretrained(tmp, safe_serialization=True)
        for f in directory.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation")):
                shutil.copy(f, tmp / f.name)

    return _made(cache_dir() / "bench" / f"{name}-hf", make)


def llama_cpp(path: Path, prompts: list[list[int]], tokens: int, prefill: list[int]) -> dict:
    """llama.cpp through llama-cpp-python's C API (`llama_decode` on batches of sequences, greedy from the
    logits): the first prompt alone, the `prefill` prompt's evaluation, then all prompts in one batch."""
    import llama_cpp as lc

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the binding prints llama.cpp's log above it
    lc.llama_backend_init()
    start = time.perf_counter()
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    params = lc.llama_context_default_params()
    params.n_seq_max = len(prompts)
    params.n_ctx = len(prompts) * max(len(prefill) + 1, *(len(p) + tokens for p in prompts))
    params.n_batch = params.n_ubatch = max(512, sum(map(len, prompts)), len(prefill))
    params.n_threads = params.n_threads_batch = torch.get_num_threads()
    ctx = lc.llama_init_from_model(model, params)
    load_s = time.perf_counter() - start
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(params.n_batch, 0, 1)

    def step(rows: list[tuple[int, int, int, bool]]) -> None:
        """Decode (token, position, sequence, wants logits) rows in one call."""
        batch.n_tokens = len(rows)
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def generate(group: list[list[int]]) -> tuple[list[float], list[list[int]]]:
        """Greedy `tokens` tokens for each prompt of `group`, one batch a step; the time after each step."""
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        step([(t, i, s, i == len(p) - 1) for s, p in enumerate(group) for i, t in enumerate(p)])
        at = list(np.cumsum([len(p) for p in group]) - 1)  # each sequence's row in the batch
        out: list[list[int]] = [[] for _ in group]
        stamps = []
        while True:
            for row, i in zip(out, at):
                row.append(int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, int(i)), (vocab,)).argmax()))
            stamps.append(time.perf_counter())
            if len(out[0]) == tokens:
                return stamps, out
            step([(row[-1], len(p) + len(row) - 1, s, True) for s, (p, row) in enumerate(zip(group, out))])
            at = list(range(len(group)))

    try:
        generate(prompts[:1])  # warm-up
        stamps, out = generate(prompts[:1])
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        start = time.perf_counter()
        step([(t, i, 0, i == len(prefill) - 1) for i, t in enumerate(prefill)])
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        generate(prompts)
        batch_s = time.perf_counter() - start
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return _report(load_s, stamps, batch_s, len(prompts), out[0]) | {"prefill_tok_s": len(prefill) / prefill_s}


def ctranslate2(hf: Path, prompts: list[list[int]], tokens: int) -> dict:
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    converted = _made(hf.with_name(hf.name + "-ct2"), lambda tmp: TransformersConverter(str(hf)).convert(str(tmp)))
    start = time.perf_counter()
    gen = ctranslate2.Generator(str(converted), device="cpu", intra_threads=torch.get_num_threads())
    load_s = time.perf_counter() - start
    vocab = _vocabulary(hf)
    texts = [[vocab[i] for i in p] for p in prompts]
    options = {"max_length": tokens, "min_length": tokens, "sampling_topk": 1, "end_token": []}
    for _ in range(2):
        stamps, out = [], []
        for step in gen.generate_tokens(texts[0], **options):
            stamps.append(time.perf_counter())
            out.append(step.token_id)
    start = time.perf_counter()
    gen.generate_batch(texts, include_prompt_in_result=False, **options)
    return _report(load_s, stamps, time.perf_counter() - start, len(prompts), out)


def _report(load_s: float, stamps: list[float], batch_s: float, rows: int, tokens: list[int]) -> dict:
    """A batching peer's rates: one stream from the times its tokens arrived (the first excluded), the
    batch from its wall time."""
    return {
        "load_s": load_s,
        "single_stream_tok_s": (len(tokens) - 1) / (stamps[-1] - stamps[0]),
        "batch8_tok_s": rows * len(tokens) / batch_s,
        "tokens": tokens,
    }


def _vocabulary(hf: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    return tok.convert_ids_to_tokens(list(range(len(tok))))


def onnxruntime_genai(hf: Path, prompts: list[list[int]], tokens: int) -> dict:
    import onnxruntime_genai as og

    def build(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp)]
        cmd += ["-p", "fp32", "-e", "cpu", "-c", str(tmp) + ".cache"]
        subprocess.run(cmd, check=True, capture_output=True)
        shutil.rmtree(str(tmp) + ".cache", ignore_errors=True)

    converted = _made(hf.with_name(hf.name + "-ort"), build)
    start = time.perf_counter()
    model = og.Model(str(converted))  # its session's threads: one per core
    load_s = time.perf_counter() - start

    pad = json.loads((converted / "genai_config.json").read_text())["model"]["pad_token_id"]

    def run(batch: list[list[int]]) -> tuple[list[float], list[int]]:
        """Time after each new token, and the first row's tokens."""
        params = og.GeneratorParams(model)
        width = max(map(len, batch))
        params.set_search_options(
            max_length=width + tokens, min_length=width + tokens, do_sample=False, batch_size=len(batch)
        )
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([[pad] * (width - len(p)) + p for p in batch], dtype=np.int32))
        stamps, out = [], []
        while not gen.is_done():
            gen.generate_next_token()
            stamps.append(time.perf_counter())
            out.append(int(gen.get_next_tokens()[0]))
        return stamps, out

    run(prompts[:1])
    stamps, out = run(prompts[:1])
    start = time.perf_counter()
    run(prompts)
    return _report(load_s, stamps, time.perf_counter() - start, len(prompts), out)

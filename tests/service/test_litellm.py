"""litellm, as front-ends use it against an OpenAI-compatible server: a plain call works, and too long a
prompt is `ContextWindowExceededError`, so litellm's context-window fallbacks trigger (our wording was not
OpenAI's, and litellm saw a plain BadRequestError)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list at import
litellm = pytest.importorskip("litellm")


def test_litellm_calls_and_recognises_context_overflow(url):
    """A chat call through litellm's openai/ provider answers; an overflowing one raises litellm's
    ContextWindowExceededError (for the before-tokenizing bound and for the exact count alike)."""
    args = {"model": "openai/tiny-random", "api_base": f"{url}/v1", "api_key": "unused", "num_retries": 0}
    r = litellm.completion(**args, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1
    for words in (20_000, 1_000):
        with pytest.raises(litellm.ContextWindowExceededError):
            litellm.completion(**args, messages=[{"role": "user", "content": "word " * words}], max_tokens=1_500)

"""Prompt-lookup drafts (speculative decoding without a draft model; transformers' `prompt_lookup_num_tokens`,
vLLM's n-gram proposer): the tokens that followed the last earlier occurrence of a sequence's final
n-gram, in its prompt or its output so far. Summaries and answers copy names, numbers and phrases from
their input, so these guesses are often right; one forward verifies them all (the scheduler plans it) and keeps
the ones the model itself would have produced (greedy), so the output is unchanged.
"""

from __future__ import annotations

import numpy as np

MAX_NGRAM = 4  # the longest final n-gram looked up first
MIN_NGRAM = 2  # one-token matches guessed wrong too often to pay for the verification


def draft(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the longest final n-gram of
    `tokens` (n from `max_ngram` down to `min_ngram`) that occurred before; [] when none did."""
    if k <= 0 or len(tokens) <= min_ngram:
        return []
    ids = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every n-gram but the final one
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return ids[start : start + k].tolist()
    return []

"""Streaming text: never half a character, never a stop string."""

from __future__ import annotations

from service.engine.detok import REPLACEMENT, Detokenizer
from service.engine.sampling_params import SamplingParams


def stream(tokenizer, text: str, stop=()) -> tuple[list[str], Detokenizer]:
    d = Detokenizer(tokenizer, stop)
    pieces = []
    for t in tokenizer.encode(text):
        pieces.append(d.push(t))
        if d.stopped:
            break
    pieces.append(d.finish())
    return pieces, d


def test_multibyte_characters_are_never_split(tiny):
    """The byte-level tokenizer cuts every multibyte character into several tokens."""
    text = "naïve café — 世界 😀 done"
    pieces, _ = stream(tiny.tokenizer, text)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in p for p in pieces)


def test_stop_string_ends_text_and_is_not_returned(tiny):
    """A stop string ends the text and is not part of it (OpenAI semantics)."""
    pieces, d = stream(tiny.tokenizer, "first line\nSTOP here and more", stop=("STOP",))
    assert d.stopped and "".join(pieces) == "first line\n"
    assert not any("S" in p for p in pieces)  # the start of the stop string was held back, never emitted


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tiny):
    """Text held back because it might begin a stop string is released once it cannot; nothing is swallowed."""
    pieces, d = stream(tiny.tokenizer, "a STO b", stop=("STOP",))
    assert not d.stopped and "".join(pieces) == "a STO b"


def test_earliest_of_several_stop_strings_wins(tiny):
    """With several stop strings the text ends at the earliest that occurs, not the first listed."""
    pieces, _ = stream(tiny.tokenizer, "one two three", stop=("three", "two"))
    assert "".join(pieces) == "one "


def test_generation_stops_on_stop_string(tiny):
    """End to end: generate with ignore_eos until a stop string that we know the model emits."""
    ids = tiny.tokenizer.encode("abc")
    free = tiny.complete(ids, SamplingParams(max_tokens=40, ignore_eos=True))
    visible = free.text.strip(REPLACEMENT)
    assert len(visible) >= 2, "the random model produced too little text for this test"
    stop = visible[len(visible) // 2 :][:2]
    r = tiny.complete(ids, SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))
    assert r.finish_reason == "stop" and stop not in r.text
    assert r.text == free.text[: free.text.index(stop)]

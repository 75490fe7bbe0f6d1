"""Answer and summarize: prompt handling, post-processing and input errors (tiny-random)."""

from __future__ import annotations

import pytest

from service.errors import ContextOverflow
from service.tasks import summarize as summaries
from service.tasks.answer import answer, supporting_passage
from service.tasks.summarize import salient, stop_after, summarize
from service.tasks.text import first_sentence, sentences_of, split_to_fit, whole_sentences


def test_first_sentence_is_one_full_sentence():
    assert first_sentence("Paris is the capital of France. It is large.") == "Paris is the capital of France."
    assert first_sentence("  The answer is 42") == "The answer is 42."
    assert first_sentence('He said "yes." Then left.') == 'He said "yes."'


def test_whole_sentences_drops_a_cut_off_tail():
    assert whole_sentences("One. Two is cut") == "One."
    assert whole_sentences("Only a fragment") == "Only a fragment"


def test_supporting_passage_picks_the_passage_with_the_new_words():
    passages = ["The Eiffel Tower is in Paris.", "Jason Mraz and Tristan Prettyman got engaged in 2008."]
    got = supporting_passage("Jason Mraz is engaged to Tristan Prettyman.", "Who is Jason Mraz engaged to?", passages)
    assert got == 1
    assert supporting_passage("I do not know.", "Who?", passages) is None


def test_answer_and_summary_are_deterministic(tiny):
    a1 = answer(tiny, "What is the capital of France?", ["Paris is the capital of France."])
    a2 = answer(tiny, "What is the capital of France?", ["Paris is the capital of France."])
    assert a1 == a2 and a1.prompt_tokens > 0
    s1 = summarize(tiny, "A long document. " * 20, length="short")
    assert s1 == summarize(tiny, "A long document. " * 20, length="short")


@pytest.mark.parametrize(
    "call",
    [
        lambda g: answer(g, "   "),
        lambda g: answer(g, "Why?", ["ok", " "]),
        lambda g: summarize(g, ""),
        lambda g: summarize(g, "text", length="huge"),
        lambda g: summarize(g, "text", max_words=0),
    ],
)
def test_bad_input_is_refused(tiny, call):
    with pytest.raises(ValueError):
        call(tiny)


def test_too_long_question_names_the_numbers(tiny):
    with pytest.raises(ContextOverflow, match=r"> the context of 2048 tokens"):
        answer(tiny, "why " * 600)


def test_split_to_fit_keeps_every_word_in_order(tiny):
    text = "First sentence here. " * 30 + "x" * 500 + ". Last one."
    pieces = split_to_fit(tiny, text, 100)
    assert all(len(tiny.tokenizer.encode(p)) <= 100 for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())


def test_long_document_goes_through_map_reduce(tiny, monkeypatch):
    """5,000 byte-tokens against a 2,048-token context: summarized in pieces (one batch), then reduced."""
    calls = []
    generate = tiny.generate
    monkeypatch.setattr(
        tiny, "generate", lambda prompts, *a, **k: calls.append(len(prompts)) or generate(prompts, *a, **k)
    )
    s = summarize(tiny, "The council met again today. " * 180, length="short")
    assert calls[0] >= 3 and calls[-1] == 1
    assert s.prompt_tokens > 2048


def test_passages_beyond_the_context_are_windowed(tiny):
    long = "Filler sentence about nothing at all. " * 150
    a = answer(tiny, "Who won?", [long, "The Broncos won the game."])
    assert a.prompt_tokens > 2048 and (a.passage_index is None or a.passage_index in (0, 1))


def test_salient_keeps_the_central_early_sentences_in_order():
    doc = (
        "The city council approved a new park budget on Monday. "
        "Weather was mild. "
        "The park budget pays for trees and benches. "
        "A reporter had lunch. "
        "Council members said the park opens in May. "
        "Budget talks for the park lasted two hours. "
        "Someone lost a hat."
    )
    assert salient(doc, 3) == (
        "The city council approved a new park budget on Monday. The park budget pays for trees and benches. "
        "Budget talks for the park lasted two hours."
    )
    assert salient("One sentence. Two sentences.", 3) is None


def test_long_documents_are_rewritten_from_salient_sentences_and_cut_to_length(tiny, monkeypatch):
    seen = []
    real = summaries.summary_messages

    def spy(document, instruction, rewrite=False):
        seen.append((document, rewrite))
        return real(document, instruction, rewrite)

    monkeypatch.setattr(summaries, "summary_messages", spy)
    doc = " ".join(f"Sentence number {i} is about the harbour." for i in range(12))
    s = summarize(tiny, doc, "short")
    assert seen[-1] == (salient(doc, 5), True)
    assert len(sentences_of(s.summary)) <= 1
    summarize(tiny, "A short note. Nothing else.", "short")
    assert seen[-1] == ("A short note. Nothing else.", False)


def test_stop_after_streams_whole_sentences_then_stops():
    sent = []
    on_piece = stop_after(2)
    pieces = ["The park", " opens.", " Work", " starts in May.", " Crowds", " cheer."]
    stops = [on_piece(0, p, lambda i, text: sent.append(text)) for p in pieces]
    assert stops == [False, False, False, False, True, True]
    assert "".join(sent) == "The park opens. Work starts in May."


def test_on_text_returning_true_stops_the_sequence(tiny):
    from service.engine.sampling import SamplingParams

    seen = []
    r = tiny.generate(
        [tiny.tokenizer.encode("hello")],
        [SamplingParams(max_tokens=40, ignore_eos=True)],
        lambda i, piece: seen.append(piece) or len(seen) >= 3,
    )[0]
    assert r.finish_reason == "stop" and len(seen) == 3 and r.completion_tokens <= 4

"""Answer and summarize: prompt handling, post-processing and input errors (tiny-random)."""

from __future__ import annotations

import math

import pytest

from service.errors import ContextOverflow
from service.tasks import summarize as summaries
from service.tasks.answer import answer, supporting_passage
from service.tasks.sentences import sentences
from service.tasks.summarize import salient, stop_after, summarize
from service.tasks.text import first_sentence, split_to_fit, whole_sentences


def test_first_sentence_is_one_full_sentence():
    """The answer is cut to its first sentence, an end mark added when the model stopped short."""
    assert first_sentence("Paris is the capital of France. It is large.") == "Paris is the capital of France."
    assert first_sentence("  The answer is 42") == "The answer is 42."
    assert first_sentence('He said "yes." Then left.') == 'He said "yes."'


def test_whole_sentences_drops_a_cut_off_tail():
    """A summary cut by the token budget loses its unfinished last sentence."""
    assert whole_sentences("One. Two is cut") == "One."
    assert whole_sentences("Only a fragment") == "Only a fragment"
    assert whole_sentences('He said "yes." Then the budget ran out at 3') == 'He said "yes."'


def test_one_splitter_keeps_abbreviations_and_decimals_in_their_sentence():
    """Six regexes in four files split "U.S." and "Dr." differently: "The U.S. economy" became two
    sentences for the summary cut, ROUGE-Lsum, copied sentences and grammar alike."""
    text = "The U.S. economy grew 3.5 percent. Dr. Smith met Mr. Jones at 5 p.m. on Friday! Was it e.g. luck?"
    want = ["The U.S. economy grew 3.5 percent.", "Dr. Smith met Mr. Jones at 5 p.m. on Friday!", "Was it e.g. luck?"]
    assert sentences(text) == want
    assert sentences("Title without a stop\n\nShare this with\nEmail\nNext line. Last") == [
        "Title without a stop",
        "Share this with",
        "Email",
        "Next line.",
        "Last",
    ]
    assert first_sentence("The U.S. capital is Washington, D.C. It is on the Potomac.") == (
        "The U.S. capital is Washington, D.C."
    )
    assert sentences("") == [] and sentences(" \n ") == []


def test_supporting_passage_picks_the_passage_with_the_new_words():
    """passage_index names the passage that holds the answer's new words, or None when none does."""
    passages = ["The Eiffel Tower is in Paris.", "Jason Mraz and Tristan Prettyman got engaged in 2008."]
    got = supporting_passage("Jason Mraz is engaged to Tristan Prettyman.", "Who is Jason Mraz engaged to?", passages)
    assert got == 1
    assert supporting_passage("I do not know.", "Who?", passages) is None


def test_answer_and_summary_are_deterministic(tiny):
    """Greedy tasks give the same result twice: no hidden state survives between requests."""
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
    """Empty questions, passages and documents, unknown lengths and max_words below 1 are InvalidRequest."""
    with pytest.raises(ValueError):
        call(tiny)


def test_too_long_question_names_the_numbers(tiny):
    """A question longer than the context is ContextOverflow naming the context size."""
    with pytest.raises(ContextOverflow, match=r"maximum context length is 2048 tokens"):
        answer(tiny, "why " * 600)


def test_split_to_fit_keeps_every_word_in_order(tiny):
    """Windowing and map-reduce pieces fit their room and drop no word, even inside a sentence longer than the
    room."""
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
    """Passages longer than the context are answered in windows instead of refused."""
    long = "Filler sentence about nothing at all. " * 150
    a = answer(tiny, "Who won?", [long, "The Broncos won the game."])
    assert a.prompt_tokens > 2048 and (a.passage_index is None or a.passage_index in (0, 1))


def test_salient_keeps_the_central_early_sentences_in_order():
    """The salient-sentence pick keeps the central early sentences in document order."""
    doc = (
        "The city council approved a new park budget on Monday. "
        "Weather was mild. "
        "The park budget pays for trees and benches. "
        "A reporter had lunch. "
        "Council members said the park opens in June. "
        "Budget talks for the park lasted two hours. "
        "Someone lost a hat."
    )
    assert salient(doc, 3) == (
        "The city council approved a new park budget on Monday. The park budget pays for trees and benches. "
        "Budget talks for the park lasted two hours."
    )
    assert salient("One sentence. Two sentences.", 3) is None


def test_long_documents_are_rewritten_from_salient_sentences_and_cut_to_length(tiny, monkeypatch):
    """Long documents are rewritten from their salient sentences; a short one goes whole; summaries are cut to the
    sentences asked for."""
    seen = []
    real = summaries.summary_messages

    def spy(document, instruction, rewrite=False):
        seen.append((document, rewrite))
        return real(document, instruction, rewrite)

    monkeypatch.setattr(summaries, "summary_messages", spy)
    doc = " ".join(f"Sentence number {i} is about the harbour." for i in range(12))
    s = summarize(tiny, doc, "short")
    assert seen[-1] == (salient(doc, 5), True)
    assert len(sentences(s.summary)) <= 1
    summarize(tiny, "A short note. Nothing else.", "short")
    assert seen[-1] == ("A short note. Nothing else.", False)


def test_stop_after_streams_whole_sentences_then_stops():
    """Generation stops when a sentence beyond those asked for begins, and that piece is not streamed."""
    on_piece = stop_after(2)
    pieces = ["The park", " opens.", " Work", " starts in June.", " Crowds", " cheer."]
    stops = [on_piece(0, p) for p in pieces]
    assert stops == [False, False, False, False, True, True]
    assert "".join(p for p, stop in zip(pieces, stops) if not stop) == "The park opens. Work starts in June."


def test_on_text_returning_true_stops_the_sequence(tiny):
    """An on_text callback returning True stops its sequence with finish reason stop."""
    from service.engine.sampling_params import SamplingParams

    seen = []
    r = tiny.generate(
        [tiny.tokenizer.encode("hello")],
        [SamplingParams(max_tokens=40, ignore_eos=True)],
        lambda i, piece: seen.append(piece) or len(seen) >= 3,
    )[0]
    assert r.finish_reason == "stop" and len(seen) == 3 and r.completion_tokens <= 4


def gate_says(tiny, yes: float):
    """The yes/no question's result, with P(yes) = `yes` among its first token's alternatives."""
    from service.engine.generator import TextResult
    from service.engine.sequence import TokenLogprob

    y, n = tiny.tokenizer.encode("yes")[0], tiny.tokenizer.encode("no")[0]
    top = [(y, math.log(yes)), (n, math.log(1 - yes))]
    return TextResult("yes", [y], 40, "length", [TokenLogprob(math.log(yes), top)], [])


def drive(plan, replies):
    """Run an answer plan, replying to each generation it asks for with the next of `replies`
    (a function of the prompts asked): the plan's own decisions, without the model's."""
    asked, value = [], None
    try:
        step = plan.send(None)
        while True:
            asked.append(step)
            step = plan.send(replies[len(asked) - 1](step))
    except StopIteration as stop:
        value = stop.value
    return asked, value


def test_passages_that_do_not_answer_get_a_sentence_saying_so(tiny, monkeypatch):
    """With passages, a model of ASKS_FIRST is first asked whether they answer: a "no" ends there with a
    sentence that says so; a "yes" goes on to the answer, which is kept when its new words are in a passage
    and replaced when they are in none (it came from elsewhere). Another model is not asked; its answers
    are checked the same way."""
    from service.engine.generator import TextResult
    from service.tasks import answer as answers
    from service.tasks.answer import answer_plan

    monkeypatch.setattr(answers, "ASKS_FIRST", {tiny.name})

    passages = ["The Broncos beat the Panthers 24-10 in Super Bowl 50."]
    asked, a = drive(answer_plan(tiny, "Who won Super Bowl 50?", passages), [lambda s: [gate_says(tiny, 0.3)]])
    assert len(asked) == 1 and asked[0].params[0].max_tokens == 1 and not asked[0].stream
    assert (a.answer, a.answered, a.passage_index) == ("The passage does not answer this question.", False, None)
    assert a.prompt_tokens == 40 and a.completion_tokens == 1

    def said(text):
        return lambda s: [TextResult(text, [1, 2, 3], 50, "stop", [], [])]

    right = said("The Broncos won Super Bowl 50. More text")
    asked, a = drive(answer_plan(tiny, "Who won Super Bowl 50?", passages), [lambda s: [gate_says(tiny, 0.7)], right])
    gate, prompt = asked[0].prompts[0], asked[1].prompts[0]
    shared = next(i for i, (x, y) in enumerate(zip(gate, prompt)) if x != y)
    assert len(asked) == 2 and asked[1].stream and shared >= len(prompt) - 16  # all but the turn end and header
    assert (a.answer, a.answered, a.passage_index) == ("The Broncos won Super Bowl 50.", True, 0)
    assert (a.prompt_tokens, a.completion_tokens) == (90, 4)
    invented = said("The Seahawks won Super Bowl 50.")
    _, a = drive(answer_plan(tiny, "Who won Super Bowl 50?", passages), [lambda s: [gate_says(tiny, 0.9)], invented])
    assert (a.answer, a.answered) == ("The passage does not answer this question.", False)
    monkeypatch.setattr(answers, "ASKS_FIRST", set())
    asked, a = drive(answer_plan(tiny, "Who won Super Bowl 50?", passages), [invented])
    assert len(asked) == 1 and asked[0].stream and not a.answered
    asked, a = drive(answer_plan(tiny, "Who won Super Bowl 50?", passages), [right])
    assert len(asked) == 1 and a.answered and a.passage_index == 0


def test_closed_book_answers_resting_on_an_unlikely_token_are_hedged(tiny):
    """Without passages, an answer is hedged when a token adding a word the question lacks had a log-probability
    under HEDGE_BELOW; an unlikely token that adds no new word (here a space: the tiny model's tokens are bytes)
    does not count, nor one past the first sentence."""
    from service.engine.generator import TextResult
    from service.engine.sequence import TokenLogprob
    from service.tasks.answer import HEDGE_BELOW, answer_plan

    text = "The Broncos won it. And more."
    ids = tiny.tokenizer.encode(text)

    def result(unlikely: str):
        at = len(tiny.tokenizer.encode(text[: text.index(unlikely)]))  # byte tokens: the word's first one
        lps = [TokenLogprob(HEDGE_BELOW * (2 if i == at else 0.1), []) for i in range(len(ids))]
        return lambda s: [TextResult(text, ids, 20, "stop", lps, [])]

    asked, a = drive(answer_plan(tiny, "Who won the game?", []), [result("Broncos")])
    assert asked[0].params[0].logprobs == 0 and a.answer == "I am not sure, but I think the Broncos won it."
    _, a = drive(answer_plan(tiny, "Who won the game?", []), [result(" won")])
    assert a.answer == "The Broncos won it."
    _, a = drive(answer_plan(tiny, "Who won the game?", []), [result("more")])  # past the first sentence
    assert a.answer == "The Broncos won it."

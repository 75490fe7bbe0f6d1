"""Direct answers: one complete sentence that restates the question, with or without passages.

Prompts go through the model's chat template when it has one; decoding is greedy by default, so the
same input gives the same output. Passages longer than the context are cut into windows; a question
that still cannot fit raises `ContextOverflow` naming the numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from model.registry import ASKS_FIRST
from service.engine.generator import TextGenerator
from service.engine.sampling_params import SamplingParams
from service.errors import InvalidRequest
from service.tasks.plans import Generate, Plan, run_plan
from service.tasks.text import content_words, first_sentence, split_to_fit

# Chosen on a random sample of SQuAD and NQ-open dev questions (full-sentence and restatement rate).
ANSWER_SYSTEM = "You answer questions in one complete sentence that repeats the subject of the question."
ANSWER_INSTRUCTION = "Answer in one complete sentence that restates the question."
# With passages, asking for the context's own words lifted SQuAD containment on the first 50 dev
# questions from 52% to 60% (full sentences 100% both); its numbers too, on Qwen2.5-Coder-1.5B, from 82% to
# 84% on each half of dev-200 ("Four teams have been ...", not a list of the teams), no answer scored lost;
# see the README's quality section.
ANSWER_FROM_CONTEXT = (
    "Answer in one complete sentence that restates the question, using the exact words and numbers of the context."
)
# With passages, a model of `model.registry.ASKS_FIRST` is first asked whether they answer the question (one
# token, the prompt's prefix shared with the answer's, so cached); below an even chance of "yes" it answers
# that they do not. With any model, an answer whose new content words are in no passage is replaced the same
# way. Told in the prompt to say so, Qwen2.5-Coder-1.5B did on 2% of 50 SQuAD questions asked of another
# article's passage; gate and check together 92%, while gating 4% of the first 100 answerable questions
# (see the README's quality section).
ANSWER_GATE = "Does the context answer this question? Reply yes or no."
GATE_BELOW = 0.5  # P(yes) / (P(yes) + P(no)) under which the passages do not answer
NOT_ANSWERED = "The {} not answer this question."
GATE_TOP = 20  # likeliest first tokens read for "yes" and "no"
# Without passages, an answer that rests on a token the model found unlikely is hedged: below e^-1 for any
# token that adds a word the question does not have. Chosen on the first 100 NQ-open dev questions
# (Qwen2.5-Coder-1.5B, 88% of its closed-book answers wrong): wrong answers stated as fact 100% -> 18%,
# right ones hedged 42% (the other 100: 30%, 40%); see the README's quality section.
HEDGE_BELOW = -1.0
HEDGE = "I am not sure, but I think "
_LOWER_FIRST = frozenset("the a an there it this that these those in on at he she they we his her their its".split())
WORDS = ("yes", "no")


@dataclass
class Answer:
    answer: str
    passage_index: int | None
    prompt_tokens: int
    completion_tokens: int
    windows: int = 1  # prompts answered: more than one when the passages had to be cut to fit
    answered: bool = True  # False: the passages do not answer the question, and `answer` says so


# An answer that says the passages do not answer the question ("The context does not mention ..."):
# a negation and a word for the given text in one answer.
_NEGATION = re.compile(r"\b(?:not|no|cannot|doesn't|don't|didn't|isn't|aren't|can't)\b", re.IGNORECASE)
_WORDS = re.compile(r"[a-z0-9]+")
_HEDGE = re.compile(
    r"\b(?:not (?:sure|certain)|I (?:think|believe)|probably|possibly|perhaps|unclear|(?:do not|don't) know)\b",
    re.IGNORECASE,
)
_THE_TEXT = re.compile(r"\b(?:context|passages?|text|document|article|information)\b", re.IGNORECASE)


def not_answered(answer: str) -> bool:
    """Whether the answer says that the passages do not answer the question."""
    return bool(_NEGATION.search(answer) and _THE_TEXT.search(answer))


def hedged(answer: str) -> bool:
    """Whether the answer hedges ("I am not sure, but ...", "probably") instead of stating a fact."""
    return bool(_HEDGE.search(answer))


def support(answer: str, question: str, text: str) -> int:
    """How many of the answer's content words beyond those of the question `text` contains."""
    return len((content_words(answer) - content_words(question)) & content_words(text))


def supporting_passage(answer: str, question: str, passages: list[str]) -> int | None:
    """The passage that best supports the answer (None when none shares a new content word)."""
    scores = [support(answer, question, p) for p in passages]
    if not scores or max(scores) == 0:
        return None
    return scores.index(max(scores))


def answer_source(question: str, passages: list[str]) -> str:
    """What an answer is checked against (support, novelty): the question and its passages."""
    return "\n".join([question, *passages])


def not_answered_sentence(passages: list[str]) -> str:
    return NOT_ANSWERED.format("passage does" if len(passages) == 1 else "passages do")


def lowest_new(tokenizer, question: str, result, sentence: str) -> float:
    """The lowest log-probability among the tokens of `sentence` (the start of `result`'s text) that add a
    word the question does not have (0.0 when none does)."""
    asked = set(_WORDS.findall(question.lower()))
    text, lowest = "", 0.0
    for token, lp in zip(result.token_ids, result.logprobs):
        if len(text) >= len(sentence):
            break
        piece = tokenizer.decode([token])
        text += piece
        if not set(_WORDS.findall(piece.lower())) <= asked:
            lowest = min(lowest, lp.logprob)
    return lowest


def hedge(sentence: str) -> str:
    """ "I am not sure, but I think ..." around the sentence (its first word lower-cased unless a name)."""
    first, _, rest = sentence.partition(" ")
    return HEDGE + (first.lower() if first.lower() in _LOWER_FIRST else first) + (f" {rest}" if rest else "")


def gate_messages(question: str, passages: list[str]) -> list[dict[str, str]]:
    """The answer's prompt with the yes/no question after it: the same prefix, cached once."""
    *head, user = answer_messages(question, passages)
    return [*head, user | {"content": f"{user['content']}\n\n{ANSWER_GATE}"}]


def says_yes(tokenizer, result) -> bool:
    """Whether "yes" outweighs "no" among the first token's likeliest ones (each word's first token, in
    either case, with or without a leading space: one token in most vocabularies)."""
    first = {w: {tokenizer.encode(v)[0] for v in (w, w.capitalize(), f" {w}", f" {w.capitalize()}")} for w in WORDS}
    p = dict.fromkeys(WORDS, 0.0)
    for token, logprob in result.logprobs[0].top if result.logprobs else []:
        for w in WORDS:
            p[w] += math.exp(logprob) if token in first[w] else 0.0
    total = p["yes"] + p["no"]
    return total == 0 or p["yes"] / total >= GATE_BELOW


def answer_messages(question: str, passages: list[str]) -> list[dict[str, str]]:
    context = ""
    if len(passages) == 1:
        context = f"Context:\n{passages[0]}\n\n"
    elif passages:
        context = "Context:\n" + "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages)) + "\n\n"
    return [
        {"role": "system", "content": ANSWER_SYSTEM},
        {
            "role": "user",
            "content": f"{ANSWER_FROM_CONTEXT if passages else ANSWER_INSTRUCTION}\n\n{context}Question: {question}",
        },
    ]


def answer(
    gen: TextGenerator,
    question: str,
    passages: list[str] = (),
    max_tokens: int = 80,
    temperature: float = 0.0,
    seed: int | None = None,
    priority: int = 0,
) -> Answer:
    """`answer_plan` run on this thread."""
    return run_plan(gen, answer_plan(gen, question, passages, max_tokens, temperature, seed), priority)


def answer_plan(
    gen: TextGenerator,
    question: str,
    passages: list[str] = (),
    max_tokens: int = 80,
    temperature: float = 0.0,
    seed: int | None = None,
) -> Plan:
    """One full sentence. Passages that do not fit the context together are cut into windows that do
    (the question is never cut); each window the model says answers the question gets an answer, and the
    one best supported by its window wins (every window, for a model not asked first). When no window
    answers, or the answer's new words are in no passage, the answer says that the passages do not
    answer (`answered` False). Without passages, an answer resting on a token the model found unlikely
    is hedged ("I am not sure, but I think ..."). Streams the raw text when there is one window (the
    final answer is the response's, not the stream's)."""
    question = question.strip()
    if not question:
        raise InvalidRequest("question is empty")
    passages = [p.strip() for p in passages]
    if any(not p for p in passages):
        raise InvalidRequest("a passage is empty")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, logprobs=None if passages else 0)
    chat, context = gen.tokenizer.chat, gen.engine.context
    ids = chat(answer_messages(question, passages))
    windows = None  # (passage index, piece) when the passages had to be cut to fit
    if passages and len(ids) + max_tokens > context:
        room = context - max_tokens - len(chat(answer_messages(question, ["."])))
        if room < 16:
            gen.engine.limits.check_fits(len(chat(answer_messages(question, []))) + 16, max_tokens)
        windows = [(i, piece) for i, p in enumerate(passages) for piece in split_to_fit(gen, p, room)]
        prompts = [chat(answer_messages(question, [piece])) for _, piece in windows]
    else:
        prompts = [ids]
        gen.engine.limits.check_fits(len(ids), max_tokens)  # refused here, naming the numbers, if it does not fit
    gate = (0, 0)  # tokens of the yes/no question: prompt, completion
    if passages and gen.name in ASKS_FIRST:  # does each prompt's text answer the question at all?
        groups = [[piece] for _, piece in windows] if windows else [passages]
        asks = [chat(gate_messages(question, g)) for g in groups]
        said = yield Generate(asks, [SamplingParams(max_tokens=1, logprobs=GATE_TOP)] * len(asks))
        gate = (sum(r.prompt_tokens for r in said), sum(r.completion_tokens for r in said))
        kept = [i for i, r in enumerate(said) if says_yes(gen.tokenizer, r)]
        if not kept:
            return Answer(not_answered_sentence(passages), None, *gate, len(asks), answered=False)
        prompts = [prompts[i] for i in kept]
        windows = [windows[i] for i in kept] if windows else None
    stage = "windows" if windows else None
    results = yield Generate(prompts, [params] * len(prompts), stream=windows is None, stage=stage)
    texts = [first_sentence(r.text) for r in results]
    if windows is None:
        best, index = 0, supporting_passage(texts[0], question, passages)
    else:
        scores = [support(t, question, piece) for t, (_, piece) in zip(texts, windows)]
        best = scores.index(max(scores))
        index = windows[best][0] if scores[best] > 0 else None
    prompt = gate[0] + sum(r.prompt_tokens for r in results)
    completion = gate[1] + sum(r.completion_tokens for r in results)
    if passages and index is None:  # no new word of the answer is in a passage: it came from elsewhere
        return Answer(not_answered_sentence(passages), None, prompt, completion, len(prompts), answered=False)
    text = texts[best]
    if not passages and lowest_new(gen.tokenizer, question, results[0], text) < HEDGE_BELOW:
        text = hedge(text)
    return Answer(text, index, prompt, completion, len(prompts))

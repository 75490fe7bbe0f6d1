"""The two tasks: direct full-sentence answers and abstractive summaries.

Prompts go through the model's chat template when it has one. Both tasks decode greedily by
default, so the same input gives the same output. An input that does not fit the context raises
`ContextOverflow` naming the numbers (chunking long inputs is the production engine's job).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.generate import TextGenerator
from service.sampling import SamplingParams

# Chosen on a random sample of SQuAD and NQ-open dev questions (full-sentence and restatement rate).
ANSWER_SYSTEM = "You answer questions in one complete sentence that repeats the subject of the question."
ANSWER_INSTRUCTION = "Answer in one complete sentence that restates the question."
SUMMARY_SYSTEM = "You write accurate, concise abstractive summaries in your own words."
# Greedy decoding of a small model loops ("The video is at CNN.com. The video is at CNN.com. ...");
# blocking repeated 4-grams of generated tokens (as BART/PEGASUS summarizers do with 3) stopped that and
# raised ROUGE-1 on 8 CNN/DM dev articles from 0.207 to 0.237. The price: an exact repeat of a 4-token
# phrase in one summary is steered away from.
SUMMARY_NO_REPEAT_NGRAM = 4
LENGTHS = {"short": (1, 60), "medium": (3, 150), "long": (5, 260)}  # sentences, token budget

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s")
_CITATION = re.compile(r"\[\d+\]\s*")  # "[2] " markers copied from numbered passages
_WORD = re.compile(r"[A-Za-z0-9]+")
STOPWORDS = frozenset(
    "a an the of to in on at by for with from and or but is are was were be been being it its this that these those "
    "who whom whose what which when where why how do does did has have had as not no".split()
)


@dataclass
class Answer:
    answer: str
    passage_index: int | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Summary:
    summary: str
    prompt_tokens: int
    completion_tokens: int


def first_sentence(text: str) -> str:
    """The first complete sentence, ending in punctuation (one is added when the model stopped short)."""
    text = " ".join(_CITATION.sub("", text).split())
    m = _SENTENCE_END.search(text + " ")
    sentence = text[: m.end()].strip() if m else text
    if sentence and sentence[-1] not in ".!?\"')":
        sentence += "."
    return sentence


def whole_sentences(text: str) -> str:
    """Drop a last sentence that was cut off by the token budget (keep the text if it is the only one)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text + " ")]
    return text[: ends[-1]].strip() if ends else text


def content_words(text: str) -> set[str]:
    return {w for w in (x.lower() for x in _WORD.findall(text)) if w not in STOPWORDS}


def supporting_passage(answer: str, question: str, passages: list[str]) -> int | None:
    """The passage sharing the most content words with the answer beyond those of the question."""
    new = content_words(answer) - content_words(question)
    scores = [len(new & content_words(p)) for p in passages]
    if not scores or max(scores) == 0:
        return None
    return scores.index(max(scores))


def answer(
    gen: TextGenerator,
    question: str,
    passages: list[str] = (),
    max_tokens: int = 80,
    temperature: float = 0.0,
    seed: int | None = None,
    priority: int = 0,
    cancelled=None,
) -> Answer:
    question = question.strip()
    if not question:
        raise ValueError("question is empty")
    passages = [p.strip() for p in passages]
    if any(not p for p in passages):
        raise ValueError("a passage is empty")
    context = ""
    if len(passages) == 1:
        context = f"Context:\n{passages[0]}\n\n"
    elif passages:
        context = "Context:\n" + "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages)) + "\n\n"
    messages = [
        {"role": "system", "content": ANSWER_SYSTEM},
        {"role": "user", "content": f"{context}Question: {question}\n{ANSWER_INSTRUCTION}"},
    ]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    ids = gen.tokenizer.chat(messages)
    gen.engine.check_fits(len(ids), params.max_tokens)
    r = gen.generate([ids], [params], cancelled=cancelled, priority=priority)[0]
    text = first_sentence(r.text)
    index = supporting_passage(text, question, passages) if passages else None
    return Answer(text, index, r.prompt_tokens, r.completion_tokens)


def summarize(
    gen: TextGenerator,
    document: str,
    length: str = "medium",
    max_words: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    priority: int = 0,
    cancelled=None,
) -> Summary:
    document = document.strip()
    if not document:
        raise ValueError("document is empty")
    if length not in LENGTHS:
        raise ValueError(f"length must be one of {', '.join(LENGTHS)}, got {length!r}")
    sentences, budget = LENGTHS[length]
    if max_words is not None:
        if max_words < 1:
            raise ValueError(f"max_words must be at least 1, got {max_words}")
        instruction, budget = f"in at most {max_words} words", int(max_words * 1.5) + 16
    else:
        instruction = "in one sentence" if sentences == 1 else f"in about {sentences} sentences"
    messages = [
        {"role": "system", "content": SUMMARY_SYSTEM},
        {"role": "user", "content": f"Summarize the following document {instruction}.\n\n{document}"},
    ]
    params = SamplingParams(
        max_tokens=budget, temperature=temperature, seed=seed, no_repeat_ngram=SUMMARY_NO_REPEAT_NGRAM
    )
    ids = gen.tokenizer.chat(messages)
    gen.engine.check_fits(len(ids), params.max_tokens)
    r = gen.generate([ids], [params], cancelled=cancelled, priority=priority)[0]
    text = " ".join(r.text.split())
    if max_words is not None:
        text = " ".join(text.split()[:max_words])
    if r.finish_reason == "length":
        text = whole_sentences(text)
    return Summary(text, r.prompt_tokens, r.completion_tokens)

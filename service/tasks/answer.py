"""Direct answers: one complete sentence that restates the question, with or without passages.

Prompts go through the model's chat template when it has one; decoding is greedy by default, so the
same input gives the same output. Passages longer than the context are cut into windows; a question
that still cannot fit raises `ContextOverflow` naming the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.generator import TextGenerator
from service.engine.sampling_params import SamplingParams
from service.errors import InvalidRequest
from service.tasks.plans import Generate, Plan, run_plan
from service.tasks.text import content_words, first_sentence, split_to_fit

# Chosen on a random sample of SQuAD and NQ-open dev questions (full-sentence and restatement rate).
ANSWER_SYSTEM = "You answer questions in one complete sentence that repeats the subject of the question."
ANSWER_INSTRUCTION = "Answer in one complete sentence that restates the question."
# With passages, asking for the context's own words lifted SQuAD containment on the first 50 dev
# questions from 52% to 60% (full sentences 100% both); see the README's quality section.
ANSWER_FROM_CONTEXT = (
    "Answer in one complete sentence that restates the question, using the exact words of the context."
)


@dataclass
class Answer:
    answer: str
    passage_index: int | None
    prompt_tokens: int
    completion_tokens: int
    windows: int = 1  # prompts answered: more than one when the passages had to be cut to fit


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
    (the question is never cut); each window gets an answer, and the one best supported by its window
    wins. Streams the raw text when there is one window."""
    question = question.strip()
    if not question:
        raise InvalidRequest("question is empty")
    passages = [p.strip() for p in passages]
    if any(not p for p in passages):
        raise InvalidRequest("a passage is empty")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
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
    stage = "windows" if windows else None
    results = yield Generate(prompts, [params] * len(prompts), stream=windows is None, stage=stage)
    texts = [first_sentence(r.text) for r in results]
    if windows is None:
        best, index = 0, supporting_passage(texts[0], question, passages)
    else:
        scores = [support(t, question, piece) for t, (_, piece) in zip(texts, windows)]
        best = scores.index(max(scores))
        index = windows[best][0] if scores[best] > 0 else None
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    return Answer(texts[best], index, prompt, completion, len(prompts))

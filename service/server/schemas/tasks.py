"""Request and response models of `/v1/answer` and `/v1/summarize`, with their limits."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.evals.scoring import MAX_REFERENCE_CHARS, MAX_REFERENCES_CHARS
from service.server.schemas.base import MAX_TOKENS, SEED, Body

MAX_QUESTION_CHARS = 4_000
MAX_PASSAGES = 32
MAX_TEXT_CHARS = 200_000  # one passage or document; longer input gets 400 before any tokenizing
MAX_FILES = 8  # documents uploaded in one request

Question = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUESTION_CHARS)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_CHARS)]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    windows: int | None = Field(
        None, description="answer: prompts answered (passages cut to fit); summary: pieces map-reduce summarized"
    )
    rounds: int | None = Field(None, description="summary: map-reduce rounds (0: the document fit the context)")


class Evaluate(Body):
    """Score the output with quality hooks (see service.evals.scoring)."""

    references: list[Annotated[str, StringConstraints(max_length=MAX_REFERENCE_CHARS)]] = Field(
        default_factory=list,
        max_length=MAX_PASSAGES,
        description=f"at most {MAX_REFERENCES_CHARS} characters in all (scoring is bounded before anything runs)",
    )
    metrics: list[str] = Field(min_length=1, max_length=8)


class AnswerRequest(Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "question": "Who is Jason Mraz engaged to?",
                    "passages": ["Jason Mraz and Tristan Prettyman got engaged on Christmas Eve 2008."],
                }
            ]
        }
    )
    question: Question
    passages: list[Text] = Field(default_factory=list, max_length=MAX_PASSAGES)
    max_tokens: int = Field(80, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = SEED
    stream: bool = Field(False, description="server-sent events: {delta} pieces, then the full response")
    evaluate: Evaluate | None = None
    format: Literal["text", "json"] = Field(
        "text", description="json: the response adds `span`, the characters of the passage that support the answer"
    )


class Upload(BaseModel):
    """The multipart form beside a task's JSON body: `files`, and the JSON body's fields as form fields
    (their text converted as a form's, unlike the strict JSON types; no `evaluate`)."""

    model_config = ConfigDict(extra="forbid")
    files: list[UploadFile] = Field(
        min_length=1,
        max_length=MAX_FILES,
        description=f"1 to {MAX_FILES} documents: .eml, Word, PowerPoint, Excel, PDF, HTML, text (type from content "
        "and name)",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = SEED
    stream: bool = Field(False, description="server-sent events: {delta} pieces, then the full response")


class AnswerUpload(Upload):
    question: Question
    max_tokens: int = Field(80, ge=1, le=MAX_TOKENS)


class SummarizeUpload(Upload):
    length: Literal["short", "medium", "long"] = "medium"
    max_words: int | None = Field(None, ge=1, le=1_000)


def multipart(form: type[Upload]) -> dict:
    """A route's `openapi_extra` declaring `form` as its multipart body, beside its JSON one."""
    return {"requestBody": {"content": {"multipart/form-data": {"schema": form.model_json_schema()}}}}


class Citation(BaseModel):
    file: str = Field(description="the uploaded file's name")
    part: str = Field(description='where in it: "slide 3", "sheet Q2", "page 2", "section Budget", "message", ...')
    start: int = Field(description="character offset of the passage in the part's text (as converted)")
    end: int
    passage: str = Field(description="the passage's text")


class Span(BaseModel):
    start: int = Field(description="character offset in the passage (as sent, stripped)")
    end: int
    text: str


class AnswerResponse(BaseModel):
    answer: str
    scores: dict[str, float | list[str]] | None = None
    passage_index: int | None = Field(description="0-based index of the passage the answer drew on, if any")
    answered: bool = Field(
        True, description="false when the passages sent do not answer the question (then the answer says so)"
    )
    span: Span | None = Field(
        None, description='with format "json": the sentence of that passage that supports the answer, if one does'
    )
    citation: Citation | None = Field(
        None, description="uploaded files: the file, part and passage the answer drew on, if any"
    )
    model: str
    usage: Usage


class SummarizeRequest(Body):
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["document"]}, {"required": ["documents"]}],  # exactly one of the two
            "examples": [
                {
                    "document": "The city council approved the new park on Monday. Construction starts in May and "
                    "the park opens next spring. Residents had asked for green space for a decade.",
                    "length": "short",
                }
            ],
        }
    )
    document: Text | None = Field(None, description="the text to summarize (or documents: one of the two)")
    documents: list[Text] | None = Field(
        None,
        min_length=1,
        max_length=MAX_PASSAGES,
        description="several documents summarized together (instead of document)",
    )
    length: Literal["short", "medium", "long"] = "medium"
    max_words: int | None = Field(None, ge=1, le=1_000)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = SEED
    stream: bool = Field(False, description="server-sent events: {delta} pieces, then the full response")
    evaluate: Evaluate | None = None
    format: Literal["text", "json"] = Field(
        "text", description="json: the response adds `sentences`, each summary sentence with its source's characters"
    )

    @model_validator(mode="after")
    def one_source(self):
        if (self.document is None) == (self.documents is None):
            raise ValueError("send either document or documents")
        return self

    def text(self) -> str:
        return self.document if self.document is not None else "\n\n".join(self.documents)


class SentenceSource(BaseModel):
    sentence: str
    file: str | None = Field(description="the uploaded file the sentence draws on, when one part shares its words")
    part: str | None = Field(description='its part: "slide 3", "sheet Q2", "page 2", "section Budget", ...')


class Source(BaseModel):
    document: int = Field(description="0-based index of the document (0 for `document`)")
    start: int = Field(description="character offset of the sentence in that document (as sent, stripped)")
    end: int
    text: str


class SummarySentence(BaseModel):
    text: str
    source: Source | None = Field(description="the document sentence sharing the most content words, if any")


class SummarizeResponse(BaseModel):
    summary: str
    sentences: list[SummarySentence] | None = Field(
        None, description='with format "json": each sentence of the summary with its source'
    )
    scores: dict[str, float | list[str]] | None = None
    citations: list[SentenceSource] | None = Field(
        None, description="uploaded files: each summary sentence with the file and part it draws on"
    )
    model: str
    usage: Usage

"""What can go wrong with a request, and the HTTP status each gets (`service.server.app` maps these classes;
nothing else decides a status):

- `InvalidRequest` (400): the input cannot work as sent; `ContextOverflow` (too long for the context)
  and `TooLarge` (more sequences than the server ever queues) name the numbers. Retrying cannot help.
  Files (`service.documents`): `UnsupportedMedia` (415) names the types read, `Unreadable` (422) says
  what failed (corrupt, encrypted, no text), `FileTooLarge` (413) gives the cap.
- `Overloaded` (429 with Retry-After): the queue is full now; the same request can succeed later.
- `RequestFailed` (500): this request failed inside the engine (its sampler, its streaming callback);
  every other request goes on.
- `EngineFailed` (503): the engine cannot run (a dead rank, a collective timeout, a device error); every
  request fails and the server exits so that a supervisor restarts it.
- `DeadlineExceeded` (504): the request outlived `--request-timeout`.
- `ClientGone` (499, which nobody reads): the client hung up before its answer.

`InvalidRequest` is a `ValueError`, so command-line callers that report bad input catch it as such.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextOverflow(InvalidRequest):
    """A prompt plus its token budget does not fit the model's context. `too_long` words it as OpenAI does
    (which clients such as litellm recognise)."""

    code = "context_length_exceeded"

    @classmethod
    def too_long(cls, context: int, prompt: int, completion: int, at_least: bool = False) -> ContextOverflow:
        asked = f"{'at least ' if at_least else ''}{prompt + completion}"
        return cls(
            f"This model's maximum context length is {context} tokens. However, you requested {asked} tokens "
            f"({'at least ' if at_least else ''}{prompt} in the messages, {completion} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="messages",
        )


class TooLarge(InvalidRequest):
    """A request of more sequences than the server queues at once: it could never be admitted."""

    code = "too_many_sequences"


class Unsupported(InvalidRequest):
    """A parameter this server implements but cannot serve for this model (tools, for a chat template that
    writes none)."""

    code = "unsupported_parameter"


class UnsupportedMedia(InvalidRequest):
    code = "unsupported_media_type"


class Unreadable(InvalidRequest):
    code = "unreadable_file"


class FileTooLarge(InvalidRequest):
    code = "file_too_large"


class Overloaded(RuntimeError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(RuntimeError):
    """One request failed on the engine thread; the engine and every other request go on."""


class EngineFailed(RuntimeError):
    pass


class DeadlineExceeded(RuntimeError):
    pass


class ClientGone(RuntimeError):
    pass

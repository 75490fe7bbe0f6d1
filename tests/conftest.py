"""Shared fixtures: tiny Hugging Face checkpoints made with `transformers` itself (the reference we
compare against) and the project's `tiny-random` model."""

from __future__ import annotations

import copy
import io
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from service.engine.generator import TextGenerator

torch.manual_seed(0)


def hf_tiny(kind: str):
    """A small random `transformers` model of one family variant, in fp32 eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=301, n_embd=64, n_layer=2, n_head=4, n_positions=256)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "qwen2-bias":
        cfg = tf.Qwen2Config(
            vocab_size=301,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            rope_theta=50000.0,
        )
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        cfg = tf.LlamaConfig(
            vocab_size=301,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=kind == "llama-gqa",
            rope_theta=10000.0,
        )
        model = tf.LlamaForCausalLM(cfg)
    for p in model.parameters():  # default init leaves norms at 1 and biases at 0: make them matter
        torch.nn.init.normal_(p, std=0.1)
    return model.float().eval()


@pytest.fixture(scope="session")
def make_hf_tiny():
    return hf_tiny


@pytest.fixture(scope="session", params=["llama-gqa", "llama-untied", "qwen2-bias", "gpt2"])
def hf_pair(request, tmp_path_factory):
    """(transformers model, directory where it is saved as safetensors)."""
    model = hf_tiny(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="session")
def tiny() -> TextGenerator:
    return TextGenerator.load("tiny-random")


def with_own_engine(gen: TextGenerator) -> TextGenerator:
    """`gen` with an engine of its own over the same weights. An engine runs one thread (one server); a
    module's long-lived server takes its own, so that the module's other tests can start `gen`'s."""
    from service.engine.core import Engine

    own = copy.copy(gen)
    own.engine = Engine(gen.engine.model, gen.tokenizer.stop_ids)
    return own


@contextmanager
def _steps_in(model: torch.nn.Module, which: str):
    """`model` with the step around its matmuls (norms, rotary, short rows' attention, SwiGLU) in torch's ops
    ("torch") or in our kernels ("ours", as a model quantized for a CPU runs them; skipped where they did
    not load), put back to torch's after."""
    from model import kernels
    from model.loader import use_native_step

    isa = None
    if which == "ours":
        isa = kernels.load()
        if isa is None:
            pytest.skip("our kernels did not load")
    use_native_step(model, isa)
    try:
        yield model
    finally:
        use_native_step(model, None)


@pytest.fixture(scope="session")
def steps_in():
    """`with steps_in(model, "torch" | "ours")`: the step around the model's matmuls in torch's ops or in our
    kernels (`_steps_in`)."""
    return _steps_in


@pytest.fixture(scope="session")
def own_engine():
    """`own_engine(gen)`: `gen` with an engine of its own (`with_own_engine`)."""
    return with_own_engine


@pytest.fixture(scope="session")
def varied(tiny):
    """The tiny model with its matrices redrawn at std 0.3: its greedy tokens vary from step to step
    (the checkpoint's repeat one token), so a token fed at the wrong step shows."""
    model = copy.deepcopy(tiny.engine.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=gen)
    return model


@contextmanager
def live_server(app):
    """Serve `app` with uvicorn on a free loopback port, on a thread, with `nlg serve`'s connection limits;
    yields its base URL."""
    import uvicorn

    from parallel.launch import free_port
    from service.server.connections import guarded

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **guarded()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def serve():
    return live_server


@pytest.fixture(scope="module")
def url(tiny, serve, own_engine):
    """A module's live server of the tiny model, with an engine of its own (a module that needs other
    settings defines its own `url`)."""
    from service.server.app import build_app

    with serve(build_app(own_engine(tiny))) as url:
        yield url


class Submitted:
    """Every sequence an app's engine is handed from now on, so that a test waits on their `done`
    events instead of polling the scheduler (`ended`), or until the engine has taken `n` (`reach`)."""

    def __init__(self, engine, monkeypatch):
        self.seqs: list = []
        self.cv = threading.Condition()
        real = engine.submit

        def submit(seqs):
            real(seqs)
            with self.cv:
                self.seqs += seqs
                self.cv.notify_all()

        monkeypatch.setattr(engine, "submit", submit)  # undone at the test's end: the engine outlives the app

    def reach(self, n: int, timeout: float = 30) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.seqs) >= n, timeout), f"only {len(self.seqs)} of {n} submitted"

    def ended(self, timeout: float = 15) -> bool:
        """True once every submitted sequence has ended (its cache slot is free by then)."""
        return all(s.done.wait(timeout) for s in list(self.seqs))


@pytest.fixture
def submitted(monkeypatch):
    """`submitted(app)`: record what the app's engine is handed (call inside `serve(app)`)."""
    return lambda app: Submitted(app.state.engine, monkeypatch)


def _docx() -> bytes:
    from docx import Document

    d = Document()
    d.add_heading("Launch", 1)
    d.add_paragraph("The launch is on Monday in Lyon.")
    d.add_heading("Budget", 1)
    d.add_paragraph("The budget is 4 million euros.")
    out = io.BytesIO()
    d.save(out)
    return out.getvalue()


def _pptx() -> bytes:
    from pptx import Presentation

    deck = Presentation()
    for i in range(1, 5):
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = f"Quarter {i}"
        slide.placeholders[1].text = "The code word is walrus." if i == 3 else f"Revenue grew {i} percent."
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def _xlsx() -> bytes:
    from openpyxl import Workbook

    book = Workbook()
    first = book.active
    first.title = "Q1"
    first.append(["region", "sales"])
    first.append(["north", 10])
    second = book.create_sheet("Q2")
    second.append(["region", "sales"])
    second.append(["south", 4242])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def _pdf() -> bytes:
    from fpdf import FPDF

    doc = FPDF()
    for text in ("The first page is an introduction.", "The treaty was signed in 1648."):
        doc.add_page()
        doc.set_font("helvetica", size=12)
        doc.cell(text=text)
    return bytes(doc.output())


@pytest.fixture(scope="session")
def office() -> dict[str, bytes]:
    """Small documents written here (python-docx, python-pptx, openpyxl, fpdf2): a Word file with sections
    Launch and Budget, a 4-slide deck with "walrus" on slide 3, a workbook with sheets Q1 and Q2 (4242 on
    Q2), a 2-page PDF with 1648 on page 2."""
    return {"docx": _docx(), "pptx": _pptx(), "xlsx": _xlsx(), "pdf": _pdf()}

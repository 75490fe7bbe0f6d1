"""Progress of long work: a document past the context streams `progress` events (its map pieces ending
one by one) before the first text, usage counts the pieces and map-reduce rounds, windowed answers count
their windows, and `nlg summarize` draws a progress bar on stderr."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from service.cli.parser import main
from service.server.app import build_app
from service.tasks.answer import answer
from service.tasks.summarize import summarize

LONG = "The council met again today. " * 180  # 5,000 byte-tokens against the tiny model's 2,048


def test_map_pieces_report_their_ends_and_usage_counts_rounds(tiny):
    """On the calling thread: `progress` hears each map piece end, in order, then the summary's usage has
    the pieces and the round; a document that fits has none."""
    heard = []
    s = summarize(tiny, LONG, length="short", progress=lambda *p: heard.append(p))
    total = heard[0][2]
    assert total >= 3 and heard == [("map", i, total) for i in range(1, total + 1)]
    assert (s.windows, s.rounds) == (total, 1)
    short = summarize(tiny, "A short note. Nothing else.", length="short")
    assert (short.windows, short.rounds) == (0, 0)
    a = answer(tiny, "Who won?", ["Filler sentence about nothing at all. " * 150, "The Broncos won the game."])
    assert a.windows >= 2


def test_a_streamed_long_summary_sends_progress_before_its_text(tiny):
    """Over HTTP: {"progress": {"stage": "map", "done", "total"}} for each piece, all before the first
    {"delta"}, then the response with usage.windows and usage.rounds."""
    with TestClient(build_app(tiny)) as c:
        with c.stream("POST", "/v1/summarize", json={"document": LONG, "length": "short", "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    progress = [e["progress"] for e in events if "progress" in e and e["progress"]["stage"] == "map"]
    total = progress[0]["total"]
    assert [p["done"] for p in progress] == list(range(1, total + 1))
    first_text = next(i for i, e in enumerate(events) if "delta" in e)
    assert all("progress" in e for e in events[:first_text])  # the map's, then the reduce prompt's prefill
    assert events[-1]["usage"]["windows"] == total and events[-1]["usage"]["rounds"] == 1


def test_nlg_summarize_draws_a_bar_for_a_long_document(capsys, monkeypatch, tmp_path):
    """The command line shows tqdm's bar on stderr for the map round and reports windows and rounds."""
    doc = tmp_path / "long.txt"
    doc.write_text(LONG)
    assert main(["summarize", str(doc), "--model", "tiny-random", "--length", "short", "--json"]) in (0, None)
    out, err = capsys.readouterr()
    assert "nlg: map" in err and "100%" in err
    data = json.loads(out)
    assert data["rounds"] == 1 and data["windows"] >= 3


def test_a_long_prompt_reports_its_prefill_before_its_first_text(tiny):
    """A prompt prefilled over several steps (the tiny model's 1,400-token prompt, 512 a step) streams
    {"progress": {"stage": "prompt", "done", "total"}} as each chunk enters the cache, before any text;
    a short one reports nothing."""
    passage = "Filler sentence about nothing at all. " * 36
    with TestClient(build_app(tiny)) as c:
        body = {"question": "What is this about?", "passages": [passage], "max_tokens": 4, "stream": True}
        with c.stream("POST", "/v1/answer", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        short = body | {"passages": ["A short passage."]}
        with c.stream("POST", "/v1/answer", json=short) as r:
            assert not any('"progress"' in line for line in r.iter_lines())
    progress = [e["progress"] for e in events if "progress" in e]
    done, total = [p["done"] for p in progress], progress[0]["total"]
    assert {p["stage"] for p in progress} == {"prompt"} and total > 1024
    assert done == sorted(done) and done[0] < total and done[-1] == total and len(done) >= 3
    assert all("progress" in e for e in events[: len(progress)])

"""`nlg` round trips on tiny-random: the JSON shapes other tools rely on, and clear errors."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import pytest

from service.cli.parser import main

TINY = ["--model", "tiny-random"]


def run_json(capsys, *args) -> dict:
    assert main([*args, *TINY, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_answer_json(capsys):
    """`nlg answer --json` with passages prints the answer object."""
    out = run_json(
        capsys, "answer", "Who is Jason Mraz engaged to?", "--passage", "Some passage.", "--passage", "Another one."
    )
    assert set(out) >= {"answer", "passage_index"}
    assert isinstance(out["answer"], str)


def test_summarize_file_and_stdin_agree(capsys, tmp_path, monkeypatch):
    """A document from a file and the same document on stdin give the same summary."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The committee met on Tuesday and approved the budget. " * 5)
    from_file = run_json(capsys, "summarize", str(doc), "--length", "short")
    monkeypatch.setattr(sys, "stdin", io.StringIO(doc.read_text()))
    from_stdin = run_json(capsys, "summarize", "-", "--length", "short")
    assert from_file["summary"] == from_stdin["summary"]


def test_score_gives_one_logprob_per_token(capsys, tiny):
    """`nlg score` gives one log-probability per token (None for the first), all at most 0."""
    out = run_json(capsys, "score", "hello world")
    assert out["token_ids"] == tiny.tokenizer.encode("hello world")
    assert len(out["tokens"]) == len(out["logprobs"]) == len(out["token_ids"])
    assert out["logprobs"][0] is None and all(lp <= 0 for lp in out["logprobs"][1:])


def test_score_matches_a_full_forward(capsys, tiny):
    """logprobs[i] is log p(token i | tokens before it): check against the model's logits directly."""
    import torch

    out = run_json(capsys, "score", "abcdef")
    ids = torch.tensor([out["token_ids"]])
    with torch.inference_mode():
        logp = tiny.engine.model(ids, torch.arange(ids.shape[1])[None])[0].log_softmax(-1)
    want = [logp[i - 1, out["token_ids"][i]].item() for i in range(1, ids.shape[1])]
    assert out["logprobs"][1:] == pytest.approx(want, abs=1e-4)


def test_generate_streams_and_json(capsys):
    """`nlg generate` streams text ending in a newline, and --json respects the token budget."""
    assert main(["generate", "hi", "--max-tokens", "5", *TINY]) == 0
    assert capsys.readouterr().out.endswith("\n")
    out = run_json(capsys, "generate", "hi", "--max-tokens", "5", "--temperature", "0.8", "--seed", "1")
    assert out["completion_tokens"] <= 5 and out["finish_reason"] in ("stop", "length")


def test_models_lists_names(capsys):
    """`nlg models` lists exactly the named models (made locally or fetched from PyPI wheels)."""
    assert main(["models", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)["models"]}
    assert names == {
        "tiny-random",
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["answer", "x", "--model", "no-such-model"], "not a named model"),
        (["summarize", "/no/such/file.txt", *TINY], "no such file"),
        (["answer", "   ", *TINY], "question is empty"),
        (["summarize", "-", "--max-words", "0", *TINY], "max_words"),
    ],
)
def test_errors_exit_2_with_one_clear_line(capsys, monkeypatch, args, message):
    """Bad command-line input exits 2 with one `nlg: error:` line, never a traceback."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("some text"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlg: error:") and message in err and err.count("\n") == 1


def test_help_reads_well():
    """--help lists every command with its one-line purpose."""
    out = subprocess.run([sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("answer", "summarize", "generate", "score", "models", "serve", "bench"):
        assert command in out.stdout


@pytest.mark.heavy
@pytest.mark.parametrize("tp", [2, 4])
def test_tiny_random_generates_the_same_at_tp_n(capfd, tp):
    """The CPU test mode exercises tensor parallelism too: tiny-random splits 1, 2 and 4 ways, and
    seeded sampling on rank 0 gives the same tokens as one process."""
    args = ["generate", "Once upon a time", "--max-tokens", "24", "--temperature", "1", "--seed", "3", *TINY]
    assert main([*args, "--json"]) == 0
    alone = json.loads(capfd.readouterr().out)
    assert main([*args, "--json", "--tp", str(tp)]) == 0
    assert json.loads(capfd.readouterr().out.strip().splitlines()[-1]) == alone
    assert len(alone["token_ids"]) == 24 and alone["text"]


def test_context_bounds_each_sequence(capsys):
    """--context limits prompt plus output per sequence: a budget beyond it exits 2 naming the numbers."""
    assert main(["generate", "hi", "--max-tokens", "200", "--context", "100", *TINY]) == 2
    assert (
        "maximum context length is 100 tokens. However, you requested 202 tokens "
        "(2 in the messages, 200 in the completion)" in capsys.readouterr().err
    )
    assert main(["generate", "hi", "--max-tokens", "20", "--context", "100", *TINY]) == 0


def test_kv_cache_memory_is_checked_against_the_device(tiny, monkeypatch):
    """On a GPU the cache is allocated at once: by default it takes a share of the free memory; a
    --kv-cache-memory that cannot fit, or that holds less than a block per sequence, names its size and
    what to change."""
    from service.engine import runner as engine_module
    from service.engine.core import Engine
    from service.engine.memory import CacheTooLarge

    monkeypatch.setattr(engine_module, "free_memory", lambda device: 3 * 2**20)
    engine = Engine(tiny.engine.model).runner
    block = engine.token_bytes() * engine.block_size  # 4 layers x 2 x 16 positions x 4 heads x 16 x 4 bytes
    cache, share = engine.new_cache(16, 512), int(3 * 2**20 * 0.9) // block  # not the 17 x 32 blocks asked
    assert share - cache.region < cache.num_blocks <= share  # whole regions
    with pytest.raises(CacheTooLarge, match=r"needs 1.00 GiB and cpu has 0.00 GiB free: lower --kv-cache-memory"):
        Engine(tiny.engine.model, kv_memory=2**30).runner.new_cache(16, 512)
    with pytest.raises(CacheTooLarge, match=r"holds 3 blocks of 16 tokens \(\d+ bytes each\) and 16 sequences"):
        Engine(tiny.engine.model, kv_memory=4 * block).runner.new_cache(16, 512)


def test_vllm_flag_names_and_defaults_in_help():
    """vLLM's names for the common serve flags parse to ours, and every option with a default shows it in
    --help (several did not)."""
    from service.cli.parser import parser

    args = parser().parse_args(
        [
            "serve",
            "--tensor-parallel-size",
            "3",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "4",
            "--served-model-name",
            "m",
        ]
    )
    assert (args.tp, args.context, args.slots, args.served_model_name) == (3, 512, 4, "m")
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert action.help and "default" in command._get_formatter()._get_help_string(action), (name, action)
                assert str(action.default) in text or "default:" in text, (name, action)

"""Real tensor-parallel ranks over gloo: tp=2 and tp=4 give tp=1's logits and greedy tokens, and a
dead rank stops the whole group quickly with no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from torch.testing import assert_close

from model.config import ModelConfig
from model.loader import load_model
from model.tiny import write_model_dir
from parallel.launch import launch
from service.engine.core import Engine
from service.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.heavy  # rank processes: `make test`, not `make test-fast`

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 11], [200, 1, 64, 33]]


def ragged(prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    return ids, torch.arange(width).expand(len(prompts), width)


def logits_and_greedy(path: str):
    """Runs on every rank: rank 0 returns (logits of a ragged batch, 32 greedy tokens per prompt, the
    greedy tokens of prompts sharing a prefix over a cache of 6 blocks: prefix hits and preemptions, and
    those of a repetitive prompt through prompt-lookup verification forwards)."""
    from model.ranks import Leader, follow
    from parallel.launch import init_from_env, shutdown
    from parallel.state import get_tp

    device = init_from_env()
    model = load_model(path)
    try:
        if get_tp().rank != 0:
            follow(model, device)
            return None
        leader = Leader(model) if get_tp().size > 1 else model
        with torch.inference_mode():
            logits = leader(*ragged(PROMPTS))
        out = Engine(leader).generate(PROMPTS, [SamplingParams(max_tokens=32, ignore_eos=True)] * 2)
        small = Engine(leader, max_batch=3)
        small.runner.kv_memory = 7 * small.runner.token_bytes() * small.runner.block_size  # the null block and 6 more
        shared = [PROMPTS[0] * 2 + [i] for i in range(3)]  # 19 tokens: its first block is cached
        pressed = small.generate(shared, [SamplingParams(max_tokens=40, ignore_eos=True)] * 3)
        assert small.scheduler.preemptions and small.scheduler.hits
        speculating = Engine(leader, prompt_lookup=5)
        looped = speculating.generate([[5, 6, 7, 8, 9] * 8], [SamplingParams(max_tokens=32, ignore_eos=True)])
        assert speculating.scheduler.drafted
        return logits, [c.token_ids for c in out], [c.token_ids for c in pressed], looped[0].token_ids
    finally:
        shutdown()


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2"])
def saved(request, tmp_path_factory, make_hf_tiny):
    """8 heads / 2 KV heads (tp=4 replicates KV heads) and GPT-2's fused Conv1D c_attn."""
    path = tmp_path_factory.mktemp(request.param)
    make_hf_tiny(request.param).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def reference(saved):
    return logits_and_greedy(saved)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_equals_tp1(saved, reference, tp):
    """Guards every shard + collective: column/row splits, bias once after the all-reduce, vocab padding
    (301 rows), KV-head replication, batch > 1 with different lengths, rank 0's sampling, and every rank's
    pool following rank 0's block tables through prefix hits and preemptions, and the multi-token
    forwards that verify prompt-lookup drafts."""
    logits, tokens, pressed, looped = launch(tp, logits_and_greedy, saved)
    assert_close(logits, reference[0], atol=1e-4, rtol=1e-4)
    assert tokens == reference[1]
    assert pressed == reference[2]
    assert looped == reference[3]


def slow_model(tmp_path) -> str:
    """A random model slow enough per step (and with a long context) to be killed mid-generation."""
    cfg = ModelConfig(
        arch="llama",
        vocab_size=259,
        hidden_size=256,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1024,
        max_position=8192,
    )
    write_model_dir(tmp_path, cfg)
    return str(tmp_path)


def ranks_of(popen: subprocess.Popen, count: int, timeout: float = 60) -> list[psutil.Process]:
    """The rank processes under a launcher, in rank order. The elastic agent starts them one after the
    other (so pids rise with rank) from multiprocessing's spawn entry; it sets RANK only after start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert popen.poll() is None, popen.communicate()
        found = []
        for child in psutil.Process(popen.pid).children(recursive=True):
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        if len(found) == count:
            return sorted(found, key=lambda p: p.pid)
        time.sleep(0.2)
    raise AssertionError(f"{count} ranks did not start")


def left_behind(processes: list[psutil.Process], timeout: float = 10) -> list[psutil.Process]:
    """The processes still running (zombies aside, which a container's init may never reap) once they
    have had `timeout` seconds to exit; returns as soon as none is."""

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + timeout
    while any(map(running, processes)) and time.time() < deadline:
        time.sleep(0.05)
    return [p for p in processes if running(p)]


@pytest.mark.parametrize("victim", ["rank1", "launcher-sigterm"])
def test_a_dead_rank_stops_everything_within_30s(tmp_path, victim):
    """Kill rank 1 mid-generation (or SIGTERM the launcher): non-zero exit, fast, no orphans."""
    model = slow_model(tmp_path)
    cmd = [sys.executable, "-m", "service.cli", "generate", "go", "--model", model, "--tp", "2"]
    cmd += ["--max-tokens", "8000", "--ignore-eos"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ranks = ranks_of(proc, 2)
        everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert proc.stdout.read(1), proc.communicate()  # the first streamed text: loaded and generating
        start = time.time()
        if victim == "rank1":
            ranks[1].send_signal(signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert time.time() - start < 30
        assert proc.returncode != 0
        if victim == "rank1":
            assert "rank 1" in err
        assert not left_behind(everyone)
    finally:
        if proc.poll() is None:
            proc.kill()


def start_serve(tmp_path, extra_env: dict | None = None):
    """`nlg serve --tp 2` on tiny-random, ready; returns (process, base URL, ranks)."""
    import httpx

    port = 18000 + (os.getpid() + len(os.listdir(tmp_path))) % 1000
    (tmp_path / f"port{port}").touch()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", "tiny-random", "--tp", "2", "--port", str(port)]
    cmd += ["--jobs-db", str(tmp_path / f"jobs{port}.sqlite")]
    env = os.environ | (extra_env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    ranks = ranks_of(proc, 2)
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url, ranks
        except httpx.TransportError:
            pass
        assert time.time() < deadline and proc.poll() is None, "never became ready"
        time.sleep(0.3)


def kill_all(proc, ranks) -> None:
    """The server and its ranks, stopped or not, gone at the end of a test."""
    for r in ranks:
        try:
            r.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.kill()


def open_stream(url: str):
    """A long stream, started and past its first event: (response context, its line iterator)."""
    import httpx

    body = {"model": "tiny-random", "prompt": "go", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    ctx = httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60)
    r = ctx.__enter__()
    assert r.status_code == 200
    lines = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
    next(lines)
    return ctx, lines


def test_serve_exits_non_zero_when_a_rank_dies(tmp_path):
    """`nlg serve --tp 2`: after rank 1 is killed, a stream in flight ends with an error event (not a
    cut connection), the service exits non-zero within 30 s naming rank 1 and the cause, and no process
    is left behind."""
    import httpx

    proc, url, ranks = start_serve(tmp_path)
    try:
        everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        ctx, lines = open_stream(url)
        start = time.time()
        ranks[1].send_signal(signal.SIGKILL)
        events = list(lines)
        ctx.__exit__(None, None, None)
        assert events[-1] == "[DONE]" and '"engine_failed"' in events[-2], events[-3:]
        _, err = proc.communicate(timeout=30)
        assert time.time() - start < 30 and proc.returncode != 0
        assert "rank 1 failed (killed by SIGKILL)" in err and "engine failed:" in err, err[-2000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/ready", timeout=2)
        assert not left_behind(everyone)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_hung_rank_fails_fast_and_answers_in_flight_requests(tmp_path):
    """A SIGSTOPped rank 1 with NLG_TP_TIMEOUT=5: the stream in flight gets its error event and the
    service exits non-zero within the timeout plus a few seconds (it took 45.7 s: the launcher waited
    30 s for a stopped rank to take its SIGTERM); no process is left behind."""
    proc, url, ranks = start_serve(tmp_path, {"NLG_TP_TIMEOUT": "5"})
    try:
        everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        ctx, lines = open_stream(url)
        start = time.time()
        ranks[1].send_signal(signal.SIGSTOP)
        events = list(lines)
        ctx.__exit__(None, None, None)
        assert events[-1] == "[DONE]" and '"engine_failed"' in events[-2], events[-3:]
        proc.communicate(timeout=30)
        assert time.time() - start < 20 and proc.returncode != 0, time.time() - start
        assert not left_behind(everyone)
    finally:
        kill_all(proc, ranks)


def test_a_stopped_rank_shows_on_ready_within_seconds_at_the_default_timeout(tmp_path):
    """An idle `--tp 2` server whose rank 1 is SIGSTOPped, at the default collective timeout: /ready
    answers every call within a second, turns 503 within 15 s (it took > 5 s per call and ~60 s in all),
    and the service exits non-zero."""
    import httpx

    proc, url, ranks = start_serve(tmp_path)
    try:
        start = time.time()
        ranks[1].send_signal(signal.SIGSTOP)
        statuses = []
        while time.time() - start < 15 and 503 not in statuses:
            began = time.time()
            try:
                statuses.append(httpx.get(f"{url}/ready", timeout=5).status_code)
            except httpx.TransportError:  # the service already exited
                statuses.append(None)
                break
            assert time.time() - began < 1.5, statuses
            time.sleep(0.5)
        assert statuses[-1] in (503, None) and time.time() - start < 15, statuses
        proc.communicate(timeout=30)
        assert proc.returncode != 0
    finally:
        kill_all(proc, ranks)


def test_sigterm_drains_streams_at_tp_2(tmp_path):
    """SIGTERM to `nlg serve --tp 2` drains like tp=1: the stream in flight ends with [DONE] and its
    finish reason, no error event, and the service exits 0 (it cut streams and exited 1 with a
    traceback: rank 1 died of the SIGTERM under rank 0)."""
    import httpx

    proc, url, _ = start_serve(tmp_path)
    try:
        body = {"model": "tiny-random", "prompt": "go", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
            next(lines)
            proc.send_signal(signal.SIGTERM)
            events = list(lines)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        _, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()

"""Real tensor-parallel ranks over gloo: tp=2 and tp=4 give tp=1's logits and greedy tokens, and a
dead rank stops the whole group quickly with no process left behind."""

from __future__ import annotations

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
from service.engine import Engine
from service.sampling import SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 8, 11], [200, 1, 64, 33]]


def ragged(prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    return ids, torch.arange(width).expand(len(prompts), width)


def logits_and_greedy(path: str):
    """Runs on every rank: rank 0 returns (logits of a ragged batch, 32 greedy tokens per prompt)."""
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
        return logits, [c.token_ids for c in out]
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
    (301 rows), KV-head replication, batch > 1 with different lengths, and rank 0's sampling."""
    logits, tokens = launch(tp, logits_and_greedy, saved)
    assert_close(logits, reference[0], atol=1e-4, rtol=1e-4)
    assert tokens == reference[1]


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


@pytest.mark.parametrize("victim", ["rank1", "launcher-sigterm"])
def test_a_dead_rank_stops_everything_within_30s(tmp_path, victim):
    """Kill rank 1 mid-generation (or SIGTERM the launcher): non-zero exit, fast, no orphans."""
    model = slow_model(tmp_path)
    cmd = [sys.executable, "-m", "service.cli", "generate", "go", "--model", model, "--tp", "2"]
    cmd += ["--max-tokens", "8000", "--ignore-eos", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ranks = ranks_of(proc, 2)
        everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        time.sleep(4)  # loaded and generating
        assert proc.poll() is None, proc.communicate()
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
        time.sleep(1)
        alive = [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_exits_non_zero_when_a_rank_dies(tmp_path):
    """`nlg serve --tp 2`: ready with both ranks; after rank 1 is killed the service stops answering
    within 30 s and exits non-zero, leaving no process behind."""
    import httpx

    port = 18000 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", "tiny-random", "--tp", "2", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/ready"
    try:
        ranks = ranks_of(proc, 2)
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "never became ready"
            time.sleep(0.3)
        everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        start = time.time()
        ranks[1].send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert time.time() - start < 30 and proc.returncode != 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=2)
        time.sleep(1)
        assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()

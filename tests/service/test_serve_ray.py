"""`nlg serve --ray` (`service.server.cluster`): a real local Ray cluster of 2 CPUs, Ray Serve, 2 tiny-random
replicas behind the ingress. Every operation of the API answers through the ingress (schemathesis, a few
examples each, never a 5xx but 504); the questions about one passage all go to one replica; a replica
SIGKILLed during 4 streams ends each with an error event, the next 20 requests all succeed, and Serve
brings it back; when every replica's queue is full the ingress says 429 with Retry-After; RayService's
import path builds the same application."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.cli.parser import parser

pytestmark = pytest.mark.heavy
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

KEY = "cluster-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PASSAGES = [
    f"Passage {n}: the dam on river {n} opened in {1930 + n} and cost {n} million dollars. " * 6 for n in range(4)
]
LONG = 1024  # tokens a stream asks for (the most a request may): time enough to kill its replica under it


@pytest.fixture(scope="module")
def ingress():
    from service.cli.serving import ray_spec
    from service.jobs.cluster import connect
    from service.server import cluster

    connect("local", cpus=2)
    argv = ["serve", "--model", "tiny-random", "--ray", "--replicas", "2", "--replica-cpus", "1"]
    argv += ["--port", str(cluster.free_serve_port()), "--api-key", KEY, "--slots", "4", "--max-waiting", "8"]
    argv += ["--request-timeout", "30"]
    url = cluster.start(ray_spec(parser().parse_args(argv)))
    yield url
    serve.shutdown()
    ray.shutdown()


def answer(url: str, question: str, passage: str | None = None, **extra) -> httpx.Response:
    body = {"question": question, "max_tokens": 4} | ({"passages": [passage]} if passage else {}) | extra
    return httpx.post(f"{url}/v1/answer", json=body, headers=AUTH, timeout=120)


def test_every_operation_through_the_ingress(ingress):
    """Schemathesis over the spec the ingress serves (a replica's): each operation, valid and invalid
    requests, 3 examples each, authenticated; never a 5xx but 504."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{ingress}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    statuses = []
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(headers=AUTH, timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500 or response.status_code == 504, response.text[:300]

        try:
            fuzz()
        except Exception as e:
            if type(e).__name__ != "Unsatisfiable":  # an operation without inputs has no invalid request
                raise
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert httpx.get(f"{ingress}/ready", timeout=30).json() == {"status": "ready", "replicas": 2, "of": 2}


def test_questions_about_one_passage_go_to_one_replica(ingress):
    """Five questions on each of four passages, interleaved: each passage's all on one replica, both
    replicas used; the routes counted by reason in /metrics."""
    served: dict[int, set[str]] = {n: set() for n in range(len(PASSAGES))}
    for q, n in itertools.product(range(5), range(len(PASSAGES))):
        r = answer(ingress, f"When did dam {n} open? ({q})", PASSAGES[n])
        assert r.status_code == 200, r.text
        served[n].add(r.headers["x-nlg-replica"])
    assert all(len(replicas) == 1 for replicas in served.values()), served
    assert set().union(*served.values()) == {"0", "1"}
    metrics = httpx.get(f"{ingress}/metrics", timeout=30).text
    assert 'nlg_routed_total{reason="prefix",replica=' in metrics
    assert 'replica="all"' in metrics and 'replica="1"' in metrics


def chat(system: str, n: int) -> dict:
    """A long stream: the system prompt, then question n."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {n}?"}]
    return {"model": "tiny-random", "messages": messages, "stream": True, "max_tokens": LONG}


def replica_pid(i: int) -> int:
    return serve.get_deployment_handle(f"replica-{i}", "nlg").pid.remote().result(timeout_s=30)


def test_a_replica_killed_mid_stream(ingress):
    """Four streams on one replica (one passage), SIGKILLed after their first events: each ends with an
    error event; the next 20 requests all succeed (on the other replica meanwhile); /ready counts both
    replicas again once Serve has restarted the dead one."""
    passage = "A passage about one dam that all four streams share. " * 12
    started, ends, replicas = threading.Barrier(5), [], []

    def stream(n: int) -> None:
        with httpx.stream(
            "POST", f"{ingress}/v1/chat/completions", json=chat(passage, n), headers=AUTH, timeout=120
        ) as r:
            assert r.status_code == 200
            replicas.append(r.headers["x-nlg-replica"])
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            started.wait(timeout=60)
            data = [line for line in lines if line.startswith("data:")]
            ends.append(data[-1] if data else "")

    warm = httpx.post(
        f"{ingress}/v1/chat/completions", json=chat(passage, 9) | {"max_tokens": 1}, headers=AUTH, timeout=60
    )
    # the replica the passage is routed to, and its process, known before the streams start: asking Serve for
    # the pid after their first events once took long enough for a stream to finish its 1024 tokens
    dead = int(warm.headers["x-nlg-replica"])
    pid = replica_pid(dead)
    threads = [threading.Thread(target=stream, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    os.kill(pid, signal.SIGKILL)
    assert replicas == [str(dead)] * 4, replicas
    for t in threads:
        t.join(timeout=120)
    assert len(ends) == 4
    assert all("replica_lost" == json.loads(end.removeprefix("data:"))["error"]["code"] for end in ends), ends
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: answer(ingress, f"After {n}?", PASSAGES[n % 4]), range(20)))
    assert [r.status_code for r in results] == [200] * 20, [r.text for r in results if r.status_code != 200]
    deadline = time.monotonic() + 180
    while httpx.get(f"{ingress}/ready", timeout=30).json().get("replicas") != 2:
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(1)


def test_every_queue_full_is_429_with_retry_after(ingress):
    """More long streams at once than both replicas run and queue (2 x (4 + 8)), each held open until every
    one has its status: the ones past that get 429 with Retry-After, and more were taken than one
    replica runs and queues."""
    all_answered = threading.Barrier(40)

    def one(n: int) -> tuple[int, str | None]:
        with httpx.stream("POST", f"{ingress}/v1/chat/completions", json=chat("", n), headers=AUTH, timeout=120) as r:
            all_answered.wait(timeout=120)  # then leave: the replicas abort the streams
            return r.status_code, r.headers.get("retry-after")

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(40)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) and all(retry for s, retry in results if s == 429)
    assert statuses.count(200) > 4 + 8, statuses


def test_the_application_builder_for_rayservice():
    """`service.cli.ray_app:app` (KubeRay's RayService, `serve run`): `nlg serve`'s flags in `argv` give the
    application `nlg serve --ray` starts: its ingress over one deployment per replica."""
    from service.cli.ray_app import app

    built = app({"argv": "--model tiny-random --replicas 3 --replica-cpus 1 --routing round-robin"})
    assert isinstance(built, serve.Application)
    ingress = built._bound_deployment
    assert ingress.name == "ingress"
    replicas, bound, by_prefix = ingress.init_args
    assert [r._bound_deployment.name for r in replicas] == ["replica-0", "replica-1", "replica-2"]
    assert (bound, by_prefix) == (16, False)

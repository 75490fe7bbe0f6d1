"""The jobs thread of `nlg serve --ray ADDRESS`: the tasks' jobs (`POST /v1/jobs`) run on the Ray cluster
instead of the server's engine, their state still in the server's SQLite store.

Pending records are taken in chunks of `CHUNK` (the store's fair order, records of one task: one engine
actor pool per chunk, `cluster.Replicas`; a job created behind a long one has its records in the next
chunk) and mapped through the replicas; each result is stored as it comes back, in
its own transaction keyed by (job, line), so a record has one result however often a retried batch
returns it. A cancelled job stops at the end of its chunk; after a restart the records that were in
flight are pending and run again. A cluster that fails (unreachable, a job error) is reported and tried
again after `RETRY_S`; its records stay pending. OpenAI batches still run on the server's own engine
(`runner.JobRunner`): each line is a request to one of its routes.
"""

from __future__ import annotations

import json
import sys

from service.jobs.cluster import BLOCK, Replicas
from service.jobs.store import JobStore
from service.jobs.worker import Loop

CHUNK = 1024  # records per pipeline run: the grain of cancelling a job
RETRY_S = 5.0


class ClusterRunner(Loop):
    def __init__(self, store: JobStore, replicas: Replicas):
        super().__init__("nlg-ray-jobs")
        self.store, self.replicas = store, replicas

    def _loop(self) -> None:
        while not self.stopping:
            try:
                task, rows = self.store.pending_tasks(CHUNK)
                if rows:
                    self._run(task, rows)
                    continue
            except Exception as e:
                print(f"nlg: error: batch jobs on Ray: {type(e).__name__}: {e}", file=sys.stderr)
                self.wake.wait(RETRY_S)
            self.wake.wait(1.0)
            self.wake.clear()

    def _run(self, task: str, rows: list[tuple[str, int, str]]) -> None:
        import ray

        items = [{"input": job, "line": line, "text": text} for job, line, text in rows]
        ds = self.replicas.map(ray.data.from_items(items, override_num_blocks=-(-len(items) // BLOCK)), task)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for line in batch["row"]:
                row = json.loads(line)
                job, n, error = row.pop("input"), row.pop("line"), row.pop("error", None)
                self.store.save(job, n, None if error else row, error)
            if self.stopping:
                return

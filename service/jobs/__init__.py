"""Batch jobs: records, resumable JSONL files (`nlg batch`) and the SQLite store with its runner thread
(`/v1/jobs`)."""

"""Evaluation: the quality-hook registry (ROUGE, QA, support, novelty, fluency), bulk evaluation over data
sets, and language-model benchmarks (LAMBADA, WikiText)."""

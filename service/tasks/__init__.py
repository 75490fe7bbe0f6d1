"""The two tasks, direct answers and abstractive summaries, as plans the engine runs."""

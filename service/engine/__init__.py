"""The engine: its loop (`core`: plan -> execute -> update), the scheduler, the model runner, the values a
step passes between them, sequences and sampling, CUDA graphs, the streaming detokenizer, the text
generator, and the async handle the HTTP side awaits."""

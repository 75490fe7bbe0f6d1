"""The engine: sequences and sampling, the batcher and the scheduler thread that own the model, CUDA graphs,
the streaming detokenizer, the text generator, and the async handle the HTTP side awaits."""

"""The HTTP service: the FastAPI app and its lifespan, error shapes, server-sent events, loading,
`routes/` (one module per API family) and `schemas/` (request and response models)."""

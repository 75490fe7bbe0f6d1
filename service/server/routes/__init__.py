"""Route handlers, one module per API family, at module level; shared state through `app.state`."""

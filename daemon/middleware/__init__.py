"""Pure ASGI middleware, one concern per module: nothing here ever buffers a stream."""

"""KV caches: on the host (numpy) and on the engine's device (bound buffers, static buckets, queued rounds)."""

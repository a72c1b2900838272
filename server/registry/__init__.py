"""The model registry, the promotion gate, the per-version model folders and promotion (hooks passed in
explicitly). Light: no TensorFlow at module level; training lives in ``server.training``."""

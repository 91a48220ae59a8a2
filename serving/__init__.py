"""Policy servers (transformers backend by default, vLLM on clusters) and the Ray Serve inference app."""

"""The deterministic pipeline: loading, determinism switches and per-image generation (worker side)."""

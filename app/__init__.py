"""Sameseed: a deterministic, provenance-first image generation service."""

__version__ = "0.1.0"

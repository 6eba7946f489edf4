"""Provenance: manifests, hashes anyone can recompute, and the reproducibility key."""

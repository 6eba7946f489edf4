"""Embedded models and the code that builds them."""

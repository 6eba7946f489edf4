"""Durable state: the archive, the SQLite ledger and the image files."""

"""The command line: commands, the HTTP client, serve wiring and the bench."""

"""Services the routes call: generation, replay, consistency. No HTTP types, no torch."""

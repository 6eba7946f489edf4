"""`python -m app devicecheck`: does the GPU path keep its promises, and how fast is it (CPU: a dry run)."""

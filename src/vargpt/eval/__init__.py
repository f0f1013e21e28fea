"""Evaluation suites (reproducible: fixed seeds, held-out data)."""

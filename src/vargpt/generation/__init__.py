"""Sampling and generation loops (free functions over explicit state; STYLE.md C7)."""

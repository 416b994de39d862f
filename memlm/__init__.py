"""Shared infrastructure for MemLM: errors, checkpoint loading, benchmark helpers."""

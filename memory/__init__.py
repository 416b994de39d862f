"""Reusable memory stores: FAISS semantic store, episodic buffer, and LTML (long-term memory
for chat models: SQLite log + sleep-phase consolidation + wake-time injection)."""

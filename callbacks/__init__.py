"""Lightning callbacks shared by MemLM architectures (TBPTT, throughput, checkpoints, analysis, LTML sleep)."""

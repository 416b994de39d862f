"""Layer 4, applications: the training CLI, chat backends, the LTML session and command line,
HMST ingestion and the Hebbian chat loop. ``train.py``, ``chat.py`` and ``serve.py`` sit on these."""

"""HMST's LightningModule (``module.HMSTLanguageModel``, stages 1-4). The plain model is
``memlm.models.hmst``; the semantic and episodic stores are ``memlm.memory``."""

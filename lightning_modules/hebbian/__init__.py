"""The Hebbian learner's LightningModule (``module.HebbianLanguageModel``); the learner itself is
``memlm.models.hebbian``."""

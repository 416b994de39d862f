"""The HTM LightningModule (``module.HTMLanguageModel``); the HTM parts are ``memlm.models.htm``."""

"""HMST, the plain model: ``moe`` (working memory), ``ssm`` (episodic Mamba block), ``model``
(``HMSTConfig``, ``HMSTModel``), ``controller`` (the 5-gate meta-controller), ``critic``.

The semantic (FAISS) and episodic stores live in ``memlm.memory``; the LightningModule is
``memlm.lightning_modules.hmst.module.HMSTLanguageModel``.
"""

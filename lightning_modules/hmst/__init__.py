"""HMST: Hierarchical Memory-State Transformer.

- ``moe``: top-k MoE feed-forward (working memory);
- ``ssm``: selective scan and the Mamba block (episodic memory);
- ``model``: ``HMSTConfig`` and ``HMSTModel``;
- ``module``: ``HMSTLanguageModel``, the stage-1 LightningModule;
- ``ingest``: writing documents into the semantic memory;
- ``controller``, ``critic``: the meta-controller and the critic.

The semantic memory and the episodic store themselves live in ``memory/``.
"""

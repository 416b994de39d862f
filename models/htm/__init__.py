"""Hierarchical Temporal Memory (Numenta BAMI, htm.core defaults), no backprop.

encoder.TokenEncoder -> spatial_pooler.SpatialPooler -> temporal_memory.TemporalMemory ->
classifier.SDRClassifier; ``memlm.lightning_modules.htm.module.HTMLanguageModel`` wires them.
"""
from memlm.models.htm.classifier import SDRClassifier
from memlm.models.htm.encoder import TokenEncoder
from memlm.models.htm.spatial_pooler import SpatialPooler
from memlm.models.htm.temporal_memory import StreamState, TemporalMemory

__all__ = ["TokenEncoder", "SpatialPooler", "TemporalMemory", "StreamState", "SDRClassifier"]

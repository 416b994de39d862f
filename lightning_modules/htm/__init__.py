"""Hierarchical Temporal Memory language model (Numenta BAMI, htm.core defaults), no backprop.

encoder.TokenEncoder -> spatial_pooler.SpatialPooler -> temporal_memory.TemporalMemory ->
classifier.SDRClassifier, wired into a LightningModule in module.HTMLanguageModel.
"""
from lightning_modules.htm.classifier import SDRClassifier
from lightning_modules.htm.encoder import TokenEncoder
from lightning_modules.htm.spatial_pooler import SpatialPooler
from lightning_modules.htm.temporal_memory import StreamState, TemporalMemory

__all__ = ["TokenEncoder", "SpatialPooler", "TemporalMemory", "StreamState", "SDRClassifier", "HTMLanguageModel"]


def __getattr__(name):  # the LightningModule pulls in lightning; import it only when asked for
    if name == "HTMLanguageModel":
        from lightning_modules.htm.module import HTMLanguageModel

        return HTMLanguageModel
    raise AttributeError(name)

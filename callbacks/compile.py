"""``torch.compile`` switch: ``--trainer.callbacks+=memlm.callbacks.compile.CompileModel``.

At ``setup`` the callback compiles the module's network in place (``nn.Module.compile``), so
the parameter names, the ``state_dict`` keys and every checkpoint stay those of the eager
model (wrapping with ``torch.compile(module)`` would prefix them with ``_orig_mod.``). Only
``pl_module.model`` is compiled: the Python-side memories (FAISS, episodic ring buffer, TBPTT
state handling) stay eager. A callback rather than a model init arg so that one switch serves
every architecture without repeating an argument in each module's signature.
"""
from __future__ import annotations

import lightning as L
import torch

from memlm.core.errors import MemLMError


class CompileModel(L.Callback):
    """Compile ``pl_module.model`` with ``torch.compile`` (``mode``/``dynamic``/``fullgraph`` as there)."""

    def __init__(self, mode: str | None = None, dynamic: bool | None = None, fullgraph: bool = False) -> None:
        self.mode, self.dynamic, self.fullgraph = mode, dynamic, fullgraph
        self.compiled = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.compiled:
            return
        net = getattr(pl_module, "model", None)
        if not isinstance(net, torch.nn.Module):
            raise MemLMError(f"{type(pl_module).__name__} has no .model network to compile; drop CompileModel from "
                             "trainer.callbacks")
        if not any(p.requires_grad for p in net.parameters()):
            raise MemLMError(f"{type(pl_module).__name__} is not gradient-trained (HTM/Hebbian): torch.compile has "
                             "nothing to speed up; drop CompileModel from trainer.callbacks")
        net.compile(mode=self.mode, dynamic=self.dynamic, fullgraph=self.fullgraph)
        self.compiled = True

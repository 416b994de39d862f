"""HTM and the Hebbian learner have no multi-process policy: under DDP (world_size > 1) they
refuse at setup with one line that says what to do, before any rank learns anything."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from memlm.core.errors import MemLMError
from memlm.lightning_modules.hebbian.module import HebbianLanguageModel
from memlm.lightning_modules.htm.module import HTMLanguageModel


def models():
    yield HebbianLanguageModel(vocab_size=64, seed=0)
    yield HTMLanguageModel(vocab_size=64)


@pytest.mark.parametrize("model", list(models()), ids=lambda m: type(m).__name__)
def test_refuses_more_than_one_process(model):
    model._trainer = SimpleNamespace(world_size=2, datamodule=None)
    with pytest.raises(MemLMError, match="--trainer.devices=1") as info:
        model.setup("fit")
    assert "\n" not in str(info.value)
    model._trainer = SimpleNamespace(world_size=1, datamodule=None)
    model.setup("fit")  # one process is fine

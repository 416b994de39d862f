"""The curriculum of the teacher-student phase as a datamodule: training batches are lessons.

    python train.py fit --config configs/hebbian_micro_teacher.yaml

Each training item is one lesson of ``memlm.models.hebbian.trainer`` (episode, stage, item,
the instruction the teacher is asked, and the opening used when the teacher cannot answer);
:class:`~memlm.lightning_modules.hebbian.module.HebbianLanguageModel` runs it against its
teacher (``model.init_args.teacher_api_url``). Validation scores, with learning off, each
lesson as the dialogue it should become: ``fallback opening -> item`` (the usual val/loss,
val/bpb and val/acc).
"""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from memlm.core.checks import require_positive
from memlm.models.hebbian.learner import TURN_SEPARATOR
from memlm.models.hebbian.trainer import (
    DEFAULT_CURRICULUM, DEFAULT_FALLBACK_OPENING, DEFAULT_LESSON_PROMPT, check_curriculum, lesson_for,
)


def _as_list(batch: list) -> list:
    return list(batch)


class LessonDataModule(L.LightningDataModule):
    def __init__(self, episodes: int = 40, curriculum: list[dict] | None = None, episodes_per_item: int = 2,
                 lesson_prompt: str = DEFAULT_LESSON_PROMPT, fallback_opening: str = DEFAULT_FALLBACK_OPENING,
                 batch_size: int = 1, vocab_size: int | None = None) -> None:
        super().__init__()
        require_positive("data", episodes=episodes, episodes_per_item=episodes_per_item, batch_size=batch_size)
        self.curriculum = check_curriculum([dict(s) for s in (curriculum or DEFAULT_CURRICULUM)])
        self.episodes, self.episodes_per_item, self.batch_size = int(episodes), int(episodes_per_item), int(batch_size)
        self.lesson_prompt, self.fallback_opening = lesson_prompt, fallback_opening
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int | None:
        return self._vocab_size

    def lessons(self) -> list[dict]:
        return [lesson_for(self.curriculum, e, self.episodes_per_item, self.lesson_prompt, self.fallback_opening).to_dict()
                for e in range(self.episodes)]

    def val_texts(self) -> list[str]:
        items = [item for stage in self.curriculum for item in stage["items"]]
        return [self.fallback_opening.format(item=item) + TURN_SEPARATOR + item for item in items]

    def train_dataloader(self):
        return DataLoader(self.lessons(), batch_size=self.batch_size, shuffle=False, collate_fn=_as_list)

    def val_dataloader(self):
        return DataLoader(self.val_texts(), batch_size=8, shuffle=False, collate_fn=_as_list)

    def test_dataloader(self):
        return self.val_dataloader()

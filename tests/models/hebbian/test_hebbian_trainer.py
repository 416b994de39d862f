"""The teacher-student phase against a real loopback teacher: serve.py serving a small Hebbian
checkpoint that was trained to give lessons. Plain loop (ConversationalTrainer) and the
Lightning path (LessonDataModule + HebbianLanguageModel, i.e. train.py fit with
configs/hebbian_micro_teacher.yaml)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest

from memlm.checkpoint import load_module
from memlm.datamodules.conversation import ConversationDataModule
from memlm.lightning_modules.hebbian.lessons import LessonDataModule
from memlm.lightning_modules.hebbian.module import HebbianLanguageModel
from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig
from memlm.models.hebbian.teacher import TeacherClient
from memlm.models.hebbian.trainer import (
    DEFAULT_FEEDBACK_PROMPT, ConversationalTrainer, lesson_for,
)

# items that are not prefixes of each other: the Hebbian teacher tells them apart by their last units
CURRICULUM = [{"stage": "sounds", "items": ["ma", "bo"]}, {"stage": "words", "items": ["dog", "cat"]}]
# the test teacher's opening and feedback start with the item: a Hebbian teacher carries the item from its
# prompt into its reply only over a short distance (the fallback opening is "hi baby! say {item}.")
OPENING = "{item}!"
FEEDBACK = "{item}! good baby."


def _lightning(tmp: Path, module, data, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(tmp), **kw)


@pytest.fixture(scope="module")
def teacher_url(tmp_path_factory):
    """serve.py on loopback, serving a Hebbian checkpoint taught to open lessons and give feedback."""
    from memlm.apps.chat_backends import LocalBackend
    from memlm.apps.serve import BackgroundServer, ServerState, create_app

    tmp = tmp_path_factory.mktemp("teacher")
    rows = []
    for _ in range(16):
        for stage in CURRICULUM:
            for item in stage["items"]:
                instruction = lesson_for([{"stage": stage["stage"], "items": [item]}], 0).instruction
                rows.append({"user": instruction, "assistant": OPENING.format(item=item)})
                for answer in ("...", item):
                    rows.append({"user": DEFAULT_FEEDBACK_PROMPT.format(answer=answer, item=item),
                                 "assistant": FEEDBACK.format(item=item)})
    data = tmp / "teacher.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    module = HebbianLanguageModel(neurons_per_column=16, synapses_per_neuron=24, temperature=0.2, calibrate_every=0)
    _lightning(tmp, module, None).fit(module, ConversationDataModule(source=str(data), batch_size=8, val_fraction=0.05))
    ckpt = tmp / "teacher.ckpt"
    module.trainer.save_checkpoint(str(ckpt))
    srv = BackgroundServer(create_app(ServerState(LocalBackend(load_module(ckpt), name="teacher"), "teacher",
                                                  max_tokens_cap=128, max_prompt_tokens=4000)))
    url = srv.start()
    yield url
    srv.stop()


def test_episodes_against_serve_py_teach_the_teachers_replies(teacher_url):
    learner = ContinualLearner(LearnerConfig(neurons_per_column=8, synapses_per_neuron=16, temperature=0.0, seed=0))
    trainer = ConversationalTrainer(learner, TeacherClient(teacher_url, timeout=30), CURRICULUM, episodes_per_item=1)
    first = trainer.run(4)  # one pass through the curriculum: a blank learner cannot answer yet
    assert [ep["lesson"].item for ep in first] == ["ma", "bo", "dog", "cat"]
    assert [ep["warning"] for ep in first] == [None] * 4  # the teacher opened and answered every lesson
    assert all(ep["opening"] and not ep["opening"].startswith("hi baby") for ep in first)  # not the fallback
    assert all(ep["feedback"] for ep in first) and first[0]["answer"] == ""
    later = trainer.run(8)
    # the learner now answers each lesson's opening with what the teacher replied to it (its feedback)
    learned = [ep["answer"] == prev["feedback"] for ep, prev in zip(later[-4:], later[-8:-4])
               if ep["opening"] == prev["opening"]]
    assert sum(learned) >= 3, [(ep["opening"], ep["answer"], ep["feedback"]) for ep in later]
    # an item the teacher's feedback names is passed once learned
    assert any(ep["passed"] for ep in later[-4:])
    assert trainer.episodes_done == 12 and learner.utterances == 24  # opening + feedback per episode


def test_teacher_down_falls_back_to_the_lesson_text():
    learner = ContinualLearner(LearnerConfig(neurons_per_column=8, synapses_per_neuron=16, seed=0))
    trainer = ConversationalTrainer(learner, TeacherClient("http://127.0.0.1:9/v1", model="m", timeout=1, retries=0),
                                    CURRICULUM)
    ep = trainer.run_episode()
    assert ep["opening"] == "hi baby! say ma." and ep["feedback"] is None
    assert "unavailable" in ep["warning"] and learner.utterances == 1


def test_lightning_lessons_log_checkpoint_and_resume(teacher_url, tmp_path):
    module = HebbianLanguageModel(neurons_per_column=8, synapses_per_neuron=16, temperature=0.0,
                                  teacher_api_url=teacher_url, teacher_timeout=30)
    data = LessonDataModule(episodes=8, curriculum=CURRICULUM, episodes_per_item=1)
    metrics = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = _lightning(tmp_path, module, data, callbacks=[Keep()], val_check_interval=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    assert not [w for w in caught if "lesson" in str(w.message)]  # the teacher answered every lesson
    assert metrics[0]["train/lesson_pass"] == 0.0 and "train/lesson_pass" in metrics[-1]
    assert all(m["train/teacher_feedback"] == 1.0 for m in metrics)
    assert "val/loss" in trainer.callback_metrics and "train/acc" in metrics[-1]
    ckpt = tmp_path / "lessons.ckpt"
    trainer.save_checkpoint(str(ckpt))
    again = load_module(ckpt)
    assert again.learner.utterances == module.learner.utterances == 16
    lesson = data.lessons()[-1]
    assert again.learner.respond(lesson["fallback_opening"]) == module.learner.respond(lesson["fallback_opening"])
    assert again.learner.state_dict()["counters"].tolist() == module.learner.state_dict()["counters"].tolist()

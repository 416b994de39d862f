"""Hebbian continual learner: a growing vocabulary, a columnar network with local plasticity,
an optional OpenAI-compatible teacher, and a LightningModule for online training."""
from lightning_modules.hebbian.learner import ContinualLearner, LearnerConfig  # noqa: F401
from lightning_modules.hebbian.network import ColumnNetwork  # noqa: F401
from lightning_modules.hebbian.teacher import TeacherClient, TeacherUnavailable  # noqa: F401
from lightning_modules.hebbian.vocab import GrowingVocab  # noqa: F401

__all__ = ["ColumnNetwork", "ContinualLearner", "GrowingVocab", "LearnerConfig", "TeacherClient", "TeacherUnavailable"]

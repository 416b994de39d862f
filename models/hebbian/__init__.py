"""Hebbian continual learner: a growing vocabulary, a columnar network with local plasticity,
and an optional OpenAI-compatible teacher."""
from memlm.models.hebbian.learner import ContinualLearner, LearnerConfig  # noqa: F401
from memlm.models.hebbian.lif import LIFColumnNetwork  # noqa: F401
from memlm.models.hebbian.network import ColumnNetwork  # noqa: F401
from memlm.models.hebbian.trainer import ConversationalTrainer  # noqa: F401
from memlm.models.hebbian.teacher import TeacherClient, TeacherUnavailable  # noqa: F401
from memlm.models.hebbian.vocab import GrowingVocab  # noqa: F401

__all__ = ["ColumnNetwork", "ContinualLearner", "ConversationalTrainer", "LIFColumnNetwork", "GrowingVocab", "LearnerConfig", "TeacherClient", "TeacherUnavailable"]

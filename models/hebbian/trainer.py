"""The teacher-student phase: an OpenAI-compatible teacher opens every episode with a lesson.

One episode (:meth:`ConversationalTrainer.run_episode`):
    1. the teacher is asked to open a lesson on the episode's item (``lesson_prompt``, e.g.
       "Hi baby! Say mama."); its opening is what the learner hears first;
    2. the learner answers the opening (no learning yet);
    3. the teacher sees the answer (``feedback_prompt``, which names the item) and replies - praise or correction - and that reply is the
       feedback *and* new training text: the learner learns the dialogue
       ``opening -> feedback`` (its own answer is not learned, so mistakes are not rehearsed);
    4. a lesson counts as passed when the learner's answer contains the item.

The curriculum is a list of stages (single sounds -> words -> short sentences), each with
items; episodes walk through it in order (``episodes_per_item`` each). When the teacher is
down or gives an empty reply, the episode falls back to the lesson text itself
(``fallback_opening``) and says so in ``warning``: learning goes on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from memlm.core.errors import MemLMError
from memlm.models.hebbian.learner import TURN_SEPARATOR, ContinualLearner
from memlm.models.hebbian.teacher import TeacherClient, TeacherUnavailable

DEFAULT_CURRICULUM: list[dict] = [
    {"stage": "sounds", "items": ["ma", "ba", "da", "pa"]},
    {"stage": "words", "items": ["mama", "papa", "cat", "dog", "ball"]},
    {"stage": "sentences", "items": ["the cat sat.", "i see a dog.", "the ball is red."]},
]
# the item comes last in both prompts, so even a teacher with a short context answers about it
DEFAULT_LESSON_PROMPT = ("You are teaching a baby to talk. In one short sentence, greet the baby and ask it to say "
                         "this ({stage}): {item}")
DEFAULT_FALLBACK_OPENING = "hi baby! say {item}."
DEFAULT_FEEDBACK_PROMPT = ("The baby answered: \"{answer}\". In one short sentence, praise it or gently correct it, "
                           "and say it again: {item}")


@dataclass(frozen=True)
class Lesson:
    episode: int
    stage: str
    item: str
    instruction: str  # what the teacher is asked, to open the lesson
    fallback_opening: str  # the opening when the teacher cannot give one

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_curriculum(curriculum: list[dict]) -> list[dict]:
    if not curriculum:
        raise MemLMError("the curriculum is empty; give stages like [{stage: words, items: [mama, cat]}]")
    for i, stage in enumerate(curriculum):
        if not isinstance(stage, dict) or not stage.get("items") or not all(isinstance(x, str) and x.strip()
                                                                             for x in stage["items"]):
            raise MemLMError(f"curriculum stage {i} needs a non-empty 'items' list of strings (and a 'stage' name)")
    return curriculum


def lesson_for(curriculum: list[dict], episode: int, episodes_per_item: int = 1,
               lesson_prompt: str = DEFAULT_LESSON_PROMPT, fallback_opening: str = DEFAULT_FALLBACK_OPENING) -> Lesson:
    """The lesson of ``episode``: the curriculum's items in order, repeated from the start when run through."""
    flat = [(s.get("stage", f"stage {i}"), item) for i, s in enumerate(curriculum) for item in s["items"]]
    stage, item = flat[(episode // max(1, episodes_per_item)) % len(flat)]
    return Lesson(episode, stage, item, lesson_prompt.format(stage=stage, item=item), fallback_opening.format(item=item))


@dataclass
class ConversationalTrainer:
    learner: ContinualLearner
    teacher: TeacherClient | None
    curriculum: list[dict] = field(default_factory=lambda: [dict(s) for s in DEFAULT_CURRICULUM])
    episodes_per_item: int = 2
    lesson_prompt: str = DEFAULT_LESSON_PROMPT
    fallback_opening: str = DEFAULT_FALLBACK_OPENING
    feedback_prompt: str = DEFAULT_FEEDBACK_PROMPT
    episodes_done: int = 0

    def __post_init__(self) -> None:
        check_curriculum(self.curriculum)

    def _ask(self, text: str, history: list[dict] | None, warnings: list[str]) -> str | None:
        if self.teacher is None:
            return None
        try:
            return self.teacher.ask(text, history=history)
        except TeacherUnavailable as exc:
            warnings.append(str(exc))
            return None

    def next_lesson(self) -> Lesson:
        return lesson_for(self.curriculum, self.episodes_done, self.episodes_per_item, self.lesson_prompt,
                          self.fallback_opening)

    def run_episode(self, lesson: Lesson | None = None) -> dict:
        """One lesson (module docstring; the next of the curriculum by default); returns what
        happened and the learning counts."""
        lesson = lesson or self.next_lesson()
        warnings: list[str] = []
        instruction = lesson.instruction
        opening = self._ask(instruction, None, warnings) or lesson.fallback_opening
        answer = self.learner.respond(opening)
        history = [{"role": "user", "content": instruction}, {"role": "assistant", "content": opening}]
        feedback = self._ask(self.feedback_prompt.format(answer=answer or "...", item=lesson.item), history, warnings)
        text = opening + (TURN_SEPARATOR + feedback if feedback else "")
        info = self.learner.learn_text(text)
        self.episodes_done += 1
        return {
            "lesson": lesson, "opening": opening, "answer": answer, "feedback": feedback,
            "passed": lesson.item.lower().strip(" .!?") in answer.lower(),
            "correct": info["correct"], "scored": info["scored"], "units": info["units"],
            "new_units": len(info["new_units"]), "warning": "; ".join(dict.fromkeys(warnings)) or None,
        }

    def run(self, episodes: int) -> list[dict]:
        return [self.run_episode() for _ in range(int(episodes))]

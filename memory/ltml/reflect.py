"""Reflection over the assistant's own turns: what did the user correct?

Each assistant answer followed by user feedback ("too long", "no bullet points", "that's
wrong, it's 78") becomes a *lesson*: a behaviour to change, in words the assistant can act
on, with the user's own words and what the answer was about kept beside it. A lesson is a
standing instruction (protected from decay, injected on every turn).

- **Rules** (default): the feedback sentence is matched against kinds of complaint (length,
  format, tone, a wrong fact) and turned into an imperative ("Keep answers shorter").
- **LLM** (with a backend): one prompt lists the (answer, reply) pairs and asks for
  ``{"lessons": [{"turn": N, "lesson": "...", "kind": ...}]}`` under :data:`REFLECT_SCHEMA`
  (``response_format``); the reply is validated with ``jsonschema`` and any pair the model
  leaves out, or a reply that is not usable, falls back to the rules.

``reflect(store)`` walks every logged (assistant, user) pair; sleep uses
:func:`lesson_from_feedback` on the pairs it consolidates, so the rules path and the stored
lessons agree.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from memlm.memory.ltml.classify import is_feedback

_SPLIT = re.compile(r"(?<=[.!?;])\s+")

#: (pattern on the feedback, the lesson it teaches, kind); the first match wins
_RULES = [
    (r"\btoo (?:long|wordy|verbose|much)\b|\bshorter\b|\bless\b(?! formal| casual)", "Keep answers shorter", "length"),
    (r"\btoo (?:short|vague)\b|\bmore detail\b", "Give fuller, more detailed answers", "length"),
    (r"\btoo formal\b", "Use a more casual tone", "tone"),
    (r"\btoo casual\b", "Use a more formal tone", "tone"),
    (r"\btoo technical\b", "Use plainer, less technical language", "tone"),
    (r"\bno (?P<what>bullet points?|lists?|emojis?|markdown)\b", "Do not use {what}", "format"),
    (r"\b(?:don't|do not|stop) (?:use|using|add|adding|put|putting) (?P<what>[^,.;!]+)", "Do not use {what}", "format"),
    (r"\b(?:don't|do not|stop) (?P<verb>say|saying|repeat|repeating|give|giving) (?P<what>[^,.;!]+)",
     "Do not {verb} {what}", "format"),
    (r"\b(?:wrong|not right|incorrect|not true)\b|^(?:no|nope),? (?:it's|it is|the answer is|actually)\b|"
     r"\bgot (?:it|that) wrong\b", "Do not repeat a corrected answer", "fact"),
    (r"\bi (?:said|told you|already told you)\b", "Use what the user already said", "fact"),
]
_RULES = [(re.compile(p, re.I), lesson, kind) for p, lesson, kind in _RULES]
_VERB_BASE = {"saying": "say", "repeating": "repeat", "giving": "give"}


def _topic(answer: str, words: int = 12) -> str:
    """The gist of an answer: its first sentence, cut to ``words`` words."""
    first = _SPLIT.split(answer.strip())[0] if answer and answer.strip() else ""
    toks = first.split()
    return " ".join(toks[:words]) + (" ..." if len(toks) > words else "")


def lesson_from_feedback(feedback: str, answer: str | None = None) -> tuple[str, str]:
    """The lesson that ``feedback`` on ``answer`` teaches, and its kind (length/format/tone/fact/other)."""
    body = feedback.strip().rstrip(".!")
    for pat, lesson, kind in _RULES:
        m = pat.search(body)
        if not m:
            continue
        groups = {k: (v or "").strip() for k, v in m.groupdict().items()}
        if "verb" in groups:
            groups["verb"] = _VERB_BASE.get(groups["verb"].lower(), groups["verb"].lower())
        text = lesson.format(**groups)
        about = f' (about "{_topic(answer)}")' if answer and kind == "fact" else ""
        return f'Lesson: {text}{about}; the user said: "{body}".', kind
    return f'Lesson: the user objected to an answer: "{body}".', "other"


@dataclass
class Correction:
    """One assistant answer the user corrected, and what to learn from it."""

    reply_id: int
    answer: str
    feedback: str
    lesson: str
    kind: str
    source: str = "rules"  # rules | llm


def feedback_pairs(store, after_id: int = 0) -> list[tuple[str, int, str]]:
    """(answer, reply id, feedback sentences) for each user message after ``after_id`` that gives
    feedback on an assistant answer: the one just before it, or, for a message that opens its
    session, the last answer of an earlier session. In log order."""
    with store._lock:
        rows = store.conn.execute(
            "SELECT id, content FROM interactions WHERE role='user' AND id > ? ORDER BY id", (after_id,)).fetchall()
    out = []
    for uid, content in rows:
        fb = [s for s in _SPLIT.split(content.strip()) if s and is_feedback(s.rstrip(".!"))]
        if not fb:
            continue
        answer = store.preceding_assistant(uid) or store.opening_answer(uid)
        if answer:
            out.append((answer, uid, " ".join(fb)))
    return out


def reflect_rules(pairs) -> list[Correction]:
    out = []
    for answer, uid, fb in pairs:
        lesson, kind = lesson_from_feedback(fb, answer)
        out.append(Correction(uid, answer, fb, lesson, kind))
    return out


REFLECT_PROMPT = (
    "You review an assistant's past answers. Each numbered item below is one answer and the user's reply to it, "
    "which criticised or corrected the answer. For each item, say in one short imperative sentence what the "
    "assistant should do differently from now on (for a wrong fact, state the correct fact as the user gave it). "
    'Reply with JSON only: {"lessons": [{"turn": <item number>, "lesson": "...", '
    '"kind": "length|format|tone|fact|other"}]}.\n\n'
)
REFLECT_SCHEMA = {
    "type": "object",
    "properties": {"lessons": {"type": "array", "items": {
        "type": "object",
        "properties": {
            "turn": {"type": "integer", "minimum": 0},
            "lesson": {"type": "string", "minLength": 3},
            "kind": {"enum": ["length", "format", "tone", "fact", "other"]},
        },
        "required": ["turn", "lesson"],
    }}},
    "required": ["lessons"],
}
REFLECT_FORMAT = {"type": "json_schema", "json_schema": {"name": "ltml_lessons", "schema": REFLECT_SCHEMA}}


def parse_reflection(reply: str, n: int) -> dict[int, tuple[str, str]] | None:
    """Validated lessons by item number (0..n-1), or None when the reply is not usable."""
    import jsonschema

    try:
        obj = json.loads(reply)
    except (TypeError, ValueError):
        m = re.search(r"\{.*\}", reply or "", re.S)
        try:
            obj = json.loads(m.group(0)) if m else None
        except ValueError:
            obj = None
    try:
        jsonschema.validate(obj, REFLECT_SCHEMA)
    except jsonschema.ValidationError:
        return None
    out = {}
    for it in obj["lessons"]:
        if 0 <= it["turn"] < n and it["lesson"].strip() and it["turn"] not in out:
            out[it["turn"]] = (it["lesson"].strip(), it.get("kind", "other"))
    return out


def reflect_llm(pairs, backend) -> list[Correction] | None:
    """Ask ``backend`` what each correction teaches; None on a reply that fails the schema."""
    if not pairs:
        return []
    items = "\n".join(f'[{i}] assistant: {a}\n    user: {fb}' for i, (a, _uid, fb) in enumerate(pairs))
    prompt = [{"role": "user", "content": REFLECT_PROMPT + items}]
    client = getattr(backend, "client", None)
    if client is not None and hasattr(client, "complete"):
        reply = client.complete(prompt, max_tokens=512, temperature=0.0, response_format=REFLECT_FORMAT)
    else:
        reply = backend.chat(prompt, max_tokens=512, temperature=0.0)
    got = parse_reflection(reply, len(pairs))
    if got is None:
        return None
    rules = reflect_rules(pairs)
    out = []
    for i, c in enumerate(rules):  # an item the model left out keeps the rules' lesson
        if i in got:
            text, kind = got[i]
            c.lesson = f'Lesson: {text.rstrip(".")}; the user said: "{c.feedback.rstrip(".!")}".'
            c.kind, c.source = kind, "llm"
        out.append(c)
    return out


def reflect(store, backend=None, after_id: int = 0, log=None) -> list[Correction]:
    """Every correction the user made to the assistant's answers after ``after_id``: through
    ``backend`` when given (validated JSON), by the rules otherwise or when the backend fails."""
    pairs = feedback_pairs(store, after_id)
    if backend is not None and pairs:
        try:
            got = reflect_llm(pairs, backend)
        except Exception as exc:  # a flaky backend must not stop reflection
            got = None
            if log:
                log(f"ltml reflect: LLM failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                    "using rules")
        if got is not None:
            return got
        if log:
            log("ltml reflect: the LLM reply failed the schema; using rules")
    return reflect_rules(pairs)

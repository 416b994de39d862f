"""Turn raw chat messages into candidate memories.

Two ways, same output (:class:`Candidate`):

- :func:`extract_rules` (no model): split user messages into clauses, recognise explicit
  requests ("remember that ..."), subject-predicate facts ("my X is Y", "I live in Y",
  "I work at Y", "I have a dog named Y", "I like/hate Y", "I am N years old"), lessons
  ("next time ...", "always ...", "never ...") and otherwise keep salient first-person
  statements (not questions, not chit-chat, mostly content words). Facts with a subject
  key can later supersede each other; the rest can only merge as near-duplicates.
- :func:`extract_llm`: ask the configured chat backend to extract durable facts,
  preferences and lessons as JSON (with a subject key and a 1-10 importance rating);
  any reply that does not parse falls back to the rule-based extractor.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

_STOP = set(
    "a an the and or but if then so of to in on at for with from by about as is are was were be been being am do does did "
    "have has had i me my mine we our you your it its this that these those there here just really very too also not no "
    "yes ok okay can could would should will shall may might must what which who whom how why when where".split()
)
_CHATTER = re.compile(
    r"^(hi|hello|hey|thanks|thank you|good (morning|night|evening|afternoon)|bye|goodbye|lol|haha|ok|okay|cool|nice|"
    r"great|sure|yes|no|yeah|nope|hmm|please|tell me|can you|could you|would you|what|how|why|when|where|who|which|"
    r"do you|did you|are you|is it|is there|let's|lets)\b",
    re.I,
)
_QUESTION_START = re.compile(r"^(what|how|why|when|where|who|which|do|does|did|is|are|can|could|would|will|should)\b", re.I)
_EXPLICIT = re.compile(
    r"^(?:please\s+|also\s+|and\s+)?(?:remember|note|don't forget|do not forget|keep in mind|never forget|memori[sz]e)"
    r"(?:\s*:\s*|\s+that\s+|\s+)(?P<rest>.+)$",
    re.I,
)
_LESSON = re.compile(
    r"\b(lesson|learned|learnt|note to self|in the future|next time|from now on|always|never|make sure|should|must)\b", re.I
)
_DISCOURSE = re.compile(
    r"^(?:(?:oh|so|well|btw|by the way|just so you know|fyi|for the record|actually|also|and|anyway|oh and|"
    r"quick update|update|news|guess what)[,:!.]?\s+)+",
    re.I,
)
_SPLIT_SENT = re.compile(r"(?<=[.!?;])\s+|\n+")
_SPLIT_CLAUSE = re.compile(r",?\s+(?:and|but|so|while)\s+(?=(?:i|my|i'm|i've)\b)", re.I)
_TRAIL = re.compile(r"[\s,.;:!]+$")
_LEAD_FILLER = re.compile(r"^(?:now|currently|actually|still|also)\s+", re.I)
_TAIL_FILLER = re.compile(
    r"\s+(?:now|these days|nowadays|anymore|at the moment|currently|too|as well|recently|today|yesterday|"
    r"(?:last|this|next) (?:week|month|year|weekend|summer|winter|spring|autumn|fall)|a (?:week|month|year) ago)$",
    re.I,
)

_ATTR_NORMAL = [
    (re.compile(r"\bfavourite\b"), "favorite"),
    (re.compile(r"\bcolour\b"), "color"),
    (re.compile(r"\b(?:current|new|old|actual|present|main|primary|usual)\s+"), ""),
]

_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(?:my name is|call me|i go by|you can call me)\s+(?P<val>.+)$", re.I), "name"),
    (re.compile(r"^i(?: am|'m) (?P<val>\d{1,3}) years? old$", re.I), "age"),
    (re.compile(r"^i(?: now| still| currently)? (?:live|am living|'m living|reside)(?: now)? (?:in|at) (?P<val>.+)$", re.I), "home"),
    (re.compile(r"^i(?: have| just)? (?:moved|relocated)(?: house)? (?:to|into) (?P<val>.+)$", re.I), "home"),
    (re.compile(r"^i(?: now| still| currently)? work (?:at|for) (?P<val>.+)$", re.I), "employer"),
    (re.compile(r"^i(?: now| still| currently)? (?:work as|am working as|'m working as|am employed as) (?P<val>.+)$", re.I), "occupation"),
    (re.compile(r"^i(?: have| just)? (?:started|got) (?:a )?(?:new )?job (?:at|with) (?P<val>.+)$", re.I), "employer"),
    (re.compile(r"^i have (?:a|an|one) (?P<thing>[a-z][a-z ]{1,30}?) (?:named|called) (?P<val>.+)$", re.I), "has"),
    (re.compile(r"^my (?P<attr>[a-z][a-z' -]{1,40}?)(?:'s name| name)? (?:is called|is named|are called|are named|is|are|=) (?P<val>.+)$", re.I), "my"),
]
_LIKE = re.compile(r"^i (?:really |truly |absolutely )?(?P<verb>like|love|enjoy|adore|prefer|hate|dislike|detest|don't like|do not like|can't stand|cannot stand) (?P<val>.+)$", re.I)
_NEG_LIKE = {"hate", "dislike", "detest", "don't like", "do not like", "can't stand", "cannot stand"}


@dataclass
class Candidate:
    """One thing worth remembering, before it meets the store."""

    text: str
    kind: str = "fact"  # fact | preference | lesson
    subject: str | None = None  # a key such that a newer value supersedes an older one
    value: str | None = None
    explicit: bool = False
    llm_importance: float | None = None  # 0..1 when an LLM rated it
    interaction_id: int | None = None
    at: float = 0.0
    #: what gets embedded: the statement in the user's own first-person form, which is how
    #: the user will later ask about it ("where do I live?" ~ "I live in Berlin")
    embed_text: str | None = None
    #: index of the source message within the batch (LLM extraction), when known
    source: int | None = None

    def __post_init__(self) -> None:
        if self.embed_text is None:
            self.embed_text = self.text


def _clean_value(v: str) -> str:
    v = _TRAIL.sub("", v.strip())
    v = _LEAD_FILLER.sub("", v)
    v = _TAIL_FILLER.sub("", v)
    return v.strip().strip("\"'")


def _norm_key(s: str) -> str:
    s = s.lower().strip()
    for pat, rep in _ATTR_NORMAL:
        s = pat.sub(rep, s)
    s = re.sub(r"[^a-z0-9]+", "_", s).strip("_")
    return s


def norm_value(v: str | None) -> str:
    v = re.sub(r"[^a-z0-9]+", " ", (v or "").lower()).strip()
    return re.sub(r"^(?:a|an|the) ", "", v)


def clauses(text: str) -> list[str]:
    out = []
    for sent in _SPLIT_SENT.split(text):
        for clause in _SPLIT_CLAUSE.split(sent.strip()):
            clause = clause.strip()
            if clause:
                out.append(clause)
    return out


def _is_question(s: str) -> bool:
    return s.rstrip().endswith("?") or bool(_QUESTION_START.match(s))


def _structured(clause: str) -> Candidate | None:
    body = _TRAIL.sub("", clause)
    for pat, kind in _PATTERNS:
        m = pat.match(body)
        if not m:
            continue
        val = _clean_value(m.group("val"))
        if not val or len(val) > 80:
            return None
        if kind == "name":
            return Candidate(f"The user's name is {val}.", "fact", "user.name", val, embed_text=f"My name is {val}.")
        if kind == "age":
            return Candidate(f"The user is {val} years old.", "fact", "user.age", val, embed_text=f"I am {val} years old.")
        if kind == "home":
            return Candidate(f"The user lives in {val}.", "fact", "user.home", val, embed_text=f"I live in {val}.")
        if kind == "employer":
            return Candidate(f"The user works at {val}.", "fact", "user.employer", val, embed_text=f"I work at {val}.")
        if kind == "occupation":
            return Candidate(f"The user works as {val}.", "fact", "user.occupation", val, embed_text=f"I work as {val}.")
        if kind == "has":
            thing = m.group("thing").strip().lower()
            return Candidate(
                f"The user has a {thing} named {val}.", "fact", f"user.{_norm_key(thing)}.name", val,
                embed_text=f"I have a {thing} named {val}.",
            )
        if kind == "my":
            attr = m.group("attr").strip()
            key = _norm_key(attr)
            if not key:
                return None
            pref = key.startswith(("favorite", "preferred")) or "favorite" in key
            verb = "are" if attr.lower().endswith("s") and not attr.lower().endswith("ss") else "is"
            return Candidate(
                f"The user's {attr.lower()} {verb} {val}.", "preference" if pref else "fact", f"user.{key}", val,
                embed_text=f"My {attr.lower()} {verb} {val}.",
            )
    m = _LIKE.match(body)
    if m:
        verb, val = m.group("verb").lower(), _clean_value(m.group("val"))
        if not val or len(val) > 80:
            return None
        polarity = "dislike" if verb in _NEG_LIKE else "like"
        text = f"The user {'dislikes' if polarity == 'dislike' else 'likes'} {val}."
        if verb == "prefer":
            text = f"The user prefers {val}."
        return Candidate(text, "preference", f"user.likes.{_norm_key(val)}", polarity, embed_text=body)
    return None


def _salient(clause: str) -> bool:
    words = re.findall(r"[A-Za-z0-9']+", clause)
    if len(words) < 5 or _CHATTER.match(clause):
        return False
    lower = [w.lower() for w in words]
    if not ({"i", "my", "i'm", "i've", "we", "our", "me"} & set(lower)):
        return False
    content = [w for w in lower if w not in _STOP and len(w) > 2]
    return len(content) / len(words) >= 0.35


def extract_rules(text: str, role: str = "user") -> list[Candidate]:
    """Rule-based extraction from one message (only the user's words become facts)."""
    if role != "user":
        return []
    out: list[Candidate] = []
    for clause in clauses(text):
        clause = _DISCOURSE.sub("", clause).strip()
        if not clause:
            continue
        explicit = False
        m = _EXPLICIT.match(clause)
        if m:
            clause, explicit = m.group("rest").strip(), True
        if not explicit and _is_question(clause):
            continue
        cand = _structured(clause)
        if cand is None:
            body = _TRAIL.sub("", clause)
            if _LESSON.search(body) and len(body.split()) >= 4:
                cand = Candidate(f"Lesson: {body}.", "lesson", embed_text=body)
            elif explicit and len(body.split()) >= 2:
                cand = Candidate(f"The user asked to remember: {body}.", "fact", embed_text=body)
            elif _salient(body):
                cand = Candidate(f"The user said: {body}.", "fact", embed_text=body)
        if cand is not None:
            cand.explicit = explicit
            out.append(cand)
    return out


LLM_PROMPT = (
    "You maintain a long-term memory about a user. From the conversation below, extract durable facts about the user, "
    "their preferences, and lessons for future conversations. Ignore small talk. Reply with only a JSON list; each item "
    'is {"text": a short third-person sentence, "kind": "fact" | "preference" | "lesson", "subject": a short snake_case '
    'key for what the statement is about (e.g. "user.home", "user.favorite_color") or null, "value": the value or null, '
    '"importance": 1-10, "source": the [number] of the message it comes from}. Reply [] if nothing is worth '
    "remembering.\n\nConversation:\n"
)


def parse_llm_items(reply: str) -> list[Candidate] | None:
    """Parse the LLM's JSON list; None when the reply is not usable."""
    m = re.search(r"\[.*\]", reply, re.S)
    if not m:
        return None
    try:
        items = json.loads(m.group(0))
    except ValueError:
        return None
    if not isinstance(items, list):
        return None
    out = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("text"), str) or not it["text"].strip():
            continue
        kind = it.get("kind") if it.get("kind") in ("fact", "preference", "lesson") else "fact"
        subject = it.get("subject") if isinstance(it.get("subject"), str) and it.get("subject").strip() else None
        value = it.get("value") if isinstance(it.get("value"), (str, int, float)) else None
        try:
            imp = min(10.0, max(1.0, float(it.get("importance", 5)))) / 10.0
        except (TypeError, ValueError):
            imp = None
        cand = Candidate(
            it["text"].strip(), kind, _norm_key(subject).replace("user_", "user.", 1) if subject else None,
            str(value) if value is not None else None, llm_importance=imp,
        )
        src = it.get("source")
        if isinstance(src, str) and src.strip().strip("[]").isdigit():
            src = int(src.strip().strip("[]"))
        cand.source = src if isinstance(src, int) and not isinstance(src, bool) else None
        out.append(cand)
    return out


def extract_llm(messages: list[tuple[str, str]], backend) -> list[Candidate] | None:
    """Ask ``backend`` (a :class:`memlm.apps.chat_backends.ChatBackend`) to extract memories.

    A remote backend answers through :class:`memlm.core.openai_client.OpenAIClient` as one
    non-streamed request, retried on 5xx/429/timeouts; any failure raises and the caller
    falls back to the rule-based extractor."""
    convo = "\n".join(f"[{i}] {role}: {content}" for i, (role, content) in enumerate(messages))
    reply = backend.chat([{"role": "user", "content": LLM_PROMPT + convo}], max_tokens=512, temperature=0.0)
    return parse_llm_items(reply)

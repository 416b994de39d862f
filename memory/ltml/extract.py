"""Turn raw chat messages into candidate memories.

Two ways, same output (:class:`Candidate`):

- :func:`extract_rules` (no model): every user sentence is classified
  (:mod:`memlm.memory.ltml.classify`) as a fact about the user, about someone else, a
  standing instruction, a temporary state, a request, a hypothetical or chatter; the first
  four become candidates, whole sentences with their dates resolved
  (:mod:`memlm.memory.ltml.dates`). Subject-predicate patterns ("my X is Y", "I live in Y",
  "I like Y") and slot finders (home, employer, commute, names of family and pets, ...)
  give a candidate a subject key so that a newer value supersedes it. A short answer is
  read against the assistant's preceding question; feedback on the assistant's last
  answer becomes a lesson.
- :func:`extract_llm`: one prompt to an OpenAI-compatible backend with a JSON schema
  (:data:`MEMORY_SCHEMA`) covering extraction, a 1-10 rating and reflection (lessons from
  the user's corrections); the reply is validated item by item, and a reply that is not
  usable falls back to the rules.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from memlm.memory.ltml.classify import (
    _STANDING,
    CHATTER, DAY, HYPOTHETICAL, INSTRUCTION, OTHER_FACT, PETS, RELATIONS, REQUEST, TEMPORARY, USER_FACT, Label, classify,
    is_feedback,
)
from memlm.memory.ltml.dates import annotate, iso_day
from memlm.memory.ltml.reflect import lesson_from_feedback

_STOP = set(
    "a an the and or but if then so of to in on at for with from by about as is are was were be been being am do does did "
    "have has had i me my mine we our you your it its this that these those there here just really very too also not no "
    "yes ok okay can could would should will shall may might must what which who whom how why when where".split()
)
_QUESTION_START = re.compile(r"^(what|how|why|when|where|who|which|do|does|did|is|are|can|could|would|will|should)\b", re.I)
_MOVED_NOWHERE = re.compile(
    r"\b(?:i|we)(?:'ve| have)? (?:just |finally |actually )?(?:moved|relocated)(?: (?:again|house|home|flat|out|away|"
    r"places|last \w+|(?:this|last) (?:week|month|year)|yesterday|recently))*\s*$", re.I)
_FIRST_PERSON_FACT = re.compile(r"^(?:i|i'm|i've|my|we|we're|our)\b", re.I)
_EXPLICIT = re.compile(
    r"^(?:please\s+|also\s+|and\s+)?(?:remember|note|don't forget|do not forget|keep in mind|never forget|memori[sz]e)"
    r"(?:\s*[:,]\s*|\s+that\s+|\s+)(?P<rest>.+)$",
    re.I,
)
#: "forget that I ...", "forget my ...", "please forget about ...": the user takes a memory back
_FORGET = re.compile(
    r"^(?:(?:please|can you|could you|you can|and)\s+)*(?:forget|stop remembering|delete|erase)\s+(?:about\s+)?"
    r"(?:that\s+)?(?P<rest>(?:i|i'm|i've|my|our|we|the)\b.+)$", re.I)
_DISCOURSE = re.compile(
    r"^(?:(?:oh|so|well|btw|by the way|just so you know|fyi|for the record|actually|also|and|anyway|oh and|"
    r"quick update|update|news|guess what)[,:!.]?\s+)+",
    re.I,
)
# a semicolon does not end a fact: "a gift from my aunt; it stands for courage" is one memory
_SPLIT_SENT = re.compile(r"(?<=[.!?])\s+|\n+")
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
    (re.compile(r"^(?:i|we)(?: have|'ve| just| finally)? (?:moved|relocated)(?: house)?(?: again)?,? (?:to|into) (?P<val>.+)$", re.I), "home"),
    (re.compile(r"^we(?: now| still| currently)? (?:live|are living|'re living) (?:in|at) (?P<val>.+)$", re.I), "home"),
    (re.compile(r"^i(?: now| usually| still| mostly)? (?P<val>drive|cycle|bike|walk|run|take the (?:train|bus|tram|metro|subway|ferry)|get the (?:train|bus)|ride (?:my|a) (?:bike|scooter)) (?:to|into) (?:work|the office)\b.*$", re.I), "commute"),
    (re.compile(r"^i(?: am|'m) (?:very |severely |badly |quite )?allergic to (?P<val>.+)$", re.I), "allergy"),
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
    kind: str = "fact"  # fact | preference | lesson | instruction | forget (a request to archive what matches)
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
    memory_class: str = "ordinary"  # identity | instruction | temporary | ordinary
    expires_at: float | None = None
    person: str | None = None
    dates: str | None = None
    #: worded as a correction ("actually", "now", "anymore"): may supersede a similar unkeyed memory
    corrects: bool = False
    #: days a temporary state lasts from when it was said (LLM extraction; rules set expires_at directly)
    expires_days: float | None = None

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
        if kind == "commute":
            return Candidate(f"The user gets to work: {body}.", "fact", "user.commute", val, embed_text=body)
        if kind == "allergy":
            return Candidate(f"The user is allergic to {val}.", "fact", f"user.allergy.{_norm_key(val)}", val,
                             embed_text=f"I am allergic to {val}.")
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
            if re.fullmatch(PETS, key) and re.search(r"\b(?:called|named|name)\b", body, re.I):
                key += ".name"  # "my cat is called X" and "I have a cat named X" are one slot
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


_CORRECTION = re.compile(
    r"\b(?:actually|now|anymore|any more|no longer|instead|these days|switched|again|not any ?more|"
    r"changed|correction|i meant)\b", re.I)
_IDENTITY_SUBJECTS = re.compile(r"^user\.(?:name|home|age|allergy|birthday|native_language|diet|health|occupation|"
                                r"employer)|"
                                rf"^user\.(?:{RELATIONS.replace(' ', '_')}|{PETS})\b|^user\.[a-z_]+\.name$")


_PLACE = r"(?P<val>[A-Z][\w'-]+(?: [A-Z][\w'-]+)*)"
_COMPANY = r"(?P<val>[A-Z][\w&'-]+(?: [A-Z][\w&'-]+)*)"
#: slots found anywhere in a sentence (the memory keeps the whole sentence; these give it a subject key
#: so that a later value supersedes it): (pattern, subject, canonical first-person wording)
_SLOTS: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"^(?:\w+[,!.]? )?(?i:i'm|i am) (?P<val>[A-Z][a-z]+)(?:,|$| (?i:and|by))"), "user.name", "My name is {v}."),
    (re.compile(rf"\b(?i:moved|relocated|moving)\b.*?\b(?i:to|in|into)\s+(?:(?i:a|the) (?:\w+ )?(?i:in) )?{_PLACE}"), "user.home",
     "I live in {v}."),
    (re.compile(rf"\b(?i:we're|we are|i'm|i am) (?:(?i:now|still) )?(?:(?i:living|based) )?(?i:in) {_PLACE}(?: (?i:now))?\b"),
     "user.home", "I live in {v}."),
    (re.compile(rf"\b(?i:bought|got) (?i:a) (?i:house|flat|place|home) (?i:in) {_PLACE}"), "user.home", "I live in {v}."),
    (re.compile(rf"\b(?i:joined|started at|starting at|start at|moved to|hired by|work at|work for|working at|"
                rf"job at|role at|now at|(?:a|the) \w+ (?:lead|manager|engineer|designer|developer) at) {_COMPANY}"),
     "user.employer", "I work at {v}."),
    (re.compile(r"\b(?i:i|i'm|i am)?\s*(?:(?i:now|usually|still|mostly|again) )?(?P<val>(?i:drive|driving|cycle|cycling|"
                r"bike|biking|walk|walking|take the \w+|taking the \w+|get the \w+|ride (?:my|a) \w+))(?: (?i:again))? "
                r"(?i:to|into) (?i:work|school|the office|uni|college)\b"), "user.commute", "I {v} to work."),
    (re.compile(r"\b(?i:i switched to|i work|i'm on|i am on) (?P<val>(?i:day|night|early|late) ?shifts?)\b"),
     "user.shift", "I work {v}."),
    (re.compile(r"\b(?i:i'm a|i am a|i'm an|i am an) (?P<val>(?i:night-shift |senior |junior )?(?i:[a-z]+ )?"
                r"(?i:paramedic|nurse|teacher|tester|developer|engineer|designer|doctor|baker|lawyer|chef|student|"
                r"driver|writer|accountant|manager|lead))\b"), "user.occupation", "I work as a {v}."),
]
#: "my partner Idris", "our dog Pilot", "my wife Anjali and I", "a greyhound, Flara", "a kitten called Mochi"
_PET_OR_KIN_NAME = re.compile(
    rf"\b(?:(?i:my|our) (?P<rel>(?i:{RELATIONS}|{PETS}))|(?i:an?|my|our) (?:(?i:new|rescue|little|old|young|baby) )?"
    rf"(?P<pet>(?i:{PETS}))),? (?:(?i:called|named) )?(?P<val>[A-Z][a-z]+)\b")
_NOT_NAMES = set("monday tuesday wednesday thursday friday saturday sunday january february march april may june july "
                 "august september october november december".split()) | _STOP


def _kin_key(rel: str) -> str:
    """The subject key of a relative's or pet's name, the same as the patterns give ("my sister is called X" ->
    user.sister, "a dog named X" -> user.dog.name)."""
    rel = rel.lower()
    return f"user.{_norm_key(rel)}.name" if re.fullmatch(PETS, rel) else f"user.{_norm_key(rel)}"


def kin_names(body: str) -> list[Candidate]:
    """A name given in passing to a relative or a pet, as its own identity memory: the sentence around it
    may be someone else's fact ("my husband Jonas works nights") or a passing event, but the name is who the
    user's family is, and stays until a newer one is given."""
    out, seen = [], set()
    for m in _PET_OR_KIN_NAME.finditer(body):
        rel, name = (m.group("rel") or m.group("pet")).lower(), m.group("val")
        key = _kin_key(rel)
        if name.lower() in _NOT_NAMES or key in seen:
            continue
        seen.add(key)
        out.append(Candidate(f"The user's {rel} is called {name}.", "fact", key, name,
                             embed_text=f"My {rel} is called {name}.", memory_class="identity"))
    return out


def _slot(body: str) -> tuple[str, str, str] | None:
    """(subject, value, canonical wording) for the first slot the sentence fills, if any."""
    for pat, subject, canon in _SLOTS:
        m = pat.search(body)
        if m:
            val = _clean_value(m.group("val"))
            if val and val.lower() not in ("the", "a", "work", "school"):
                return subject, val, canon.format(v=val)
    # a relative's or pet's name in passing is its own memory (kin_names); keying the whole sentence by it would
    # merge every later sentence that names them ("Pilot turned five", "Pilot loves the beach") into one
    return None


#: an assistant question the user answered in a few words, read back as a first-person statement
_QA = [
    (re.compile(r"\bare you (?:still )?(?:in|living in|based in) (?P<v>[A-Z][\w'-]+)", re.I), "yes", "I live in {v}."),
    (re.compile(r"\bwhere (?:are you based|do you live|are you living|do you live now)\b", re.I), "value", "I live in {a}."),
    (re.compile(r"\bdo you (?:still )?(?P<v>drive|cycle|walk|take the \w+) to (?:work|school)", re.I), "yes", "I {v} to work."),
    (re.compile(rf"\bwhat(?:'s| is) (?:your|his|her) (?P<r>{RELATIONS}|{PETS})(?:'s)? (?:name|called)\b", re.I), "value",
     "My {r} is called {a}."),
    (re.compile(r"\bwhat(?:'s| is) (?:his|her|their) name\b", re.I), "value", "Their name is {a}."),
]
_YES = re.compile(r"^(?:yes|yep|yeah|yup|sure|correct|right|indeed|still am|i do|that's right)\b", re.I)


def _qa_statement(question: str, answer: str) -> str | None:
    first = re.sub(r"^(?:no|nope|nah|yes|yep|yeah)[,!.]?\s*", "", answer.strip(), flags=re.I)
    first = re.split(r"[,;.!]|\bby the way\b| but ", first)[0].strip()
    for pat, how, canon in _QA:
        m = pat.search(question)
        if not m:
            continue
        if how == "yes":
            if _YES.match(answer.strip()):
                return canon.format(**m.groupdict(), a=first)
            return None
        if first:
            return canon.format(**{k: (v or "").lower() for k, v in m.groupdict().items()}, a=first)
    return None


def _first_person(body: str) -> str:
    """'my sister lives in Ghent' -> "the user's sister lives in Ghent" (the third person the memory is told in)."""
    return re.sub(r"^(?:my|our)\b", "the user's", body, count=1, flags=re.I)


def _memory_class(cand: Candidate, label: Label) -> str:
    if cand.kind in ("instruction", "lesson"):
        return "instruction"
    if label.label == TEMPORARY:
        return "temporary"
    if (cand.subject and _IDENTITY_SUBJECTS.match(cand.subject)) or label.identity:
        return "identity"
    return "ordinary"


_KIN_WORD = re.compile(rf"\b(?:{RELATIONS}|{PETS})\b", re.I)


def _short_answer(text: str, question: str, context: str = "") -> Candidate:
    body = _TRAIL.sub("", text.strip())
    q = question.strip()
    cand = Candidate(f'Asked "{q}", user: {body}.', "fact", embed_text=f"{q} {body}")
    statement = _qa_statement(q, body)
    if statement and statement.startswith("Their name is "):
        # "What's her name?" "Biscuit": whose name is the last relative or pet the conversation mentioned
        kin = _KIN_WORD.findall(context)
        if kin:
            statement = f"My {kin[-1].lower()} is called {statement[len('Their name is '):]}"
        else:
            cand.memory_class = "identity"  # a name asked for is somebody close, even when we cannot tell whose
    if statement:  # "are you still in Aarhus?" "yep" -> "I live in Aarhus." keyed like a stated fact
        found = _structured(_TRAIL.sub("", statement)) or None
        slot = _slot(statement)
        if found is not None and found.subject:
            cand.subject, cand.value = found.subject, found.value
        elif slot is not None:
            cand.subject, cand.value = slot[0], slot[1]
        cand.embed_text = f"{statement} {q} {body}"
    label = classify(statement or q)
    if cand.memory_class != "identity":
        cand.memory_class = _memory_class(cand, label if statement else Label(USER_FACT))
    return cand


def extract_rules(text: str, role: str = "user", prev_assistant: str | None = None,
                  at: float | None = None, context: str = "", last_answer: str | None = None) -> list[Candidate]:
    """Rule-based extraction from one message (only the user's words become memories).

    Every sentence is classified (:func:`memlm.memory.ltml.classify.classify`); facts about
    the user and about other people, standing instructions and temporary states become
    candidates, questions, requests, hypotheticals and chatter do not (the raw log keeps
    them for wake). ``prev_assistant`` (the assistant message just before) resolves short
    answers ("yep", "nope, dentist") and turns feedback on that answer into a lesson;
    ``at`` (when the message was written) resolves relative dates and sets expiries; ``context`` (the user's
    message before that) tells whose name "What's her name?" asked for; ``last_answer`` (for a
    message that opens its session: the assistant's last answer in an earlier one) is what
    feedback there refers to ("that was too long" the next morning)."""
    if role != "user":
        return []
    out: list[Candidate] = []
    words = re.findall(r"[A-Za-z0-9']+", text)
    plain = _TRAIL.sub("", _DISCOURSE.sub("", text.strip()))
    # a few words after the assistant's question are an answer to it, unless they are a whole statement
    # on their own ("My main hobby is bouldering.")
    statement = _structured(plain) is not None or (
        len(words) >= 3 and re.search(r"\b(?:i|i'm|i've|my|we|we're|our)\b", plain, re.I) is not None)
    # "Remember, no emojis" after a question is a standing instruction, not an answer to it
    if statement is False:
        explicit = _EXPLICIT.match(plain)
        statement = explicit is not None or classify(_TRAIL.sub("", plain)).label == INSTRUCTION
    if (prev_assistant and prev_assistant.rstrip().endswith("?") and 0 < len(words) <= 6
            and not text.rstrip().endswith("?") and not statement):
        question = _SPLIT_SENT.split(prev_assistant.strip())[-1]
        if not is_feedback(text):
            cand = _short_answer(text, question, f"{context} {prev_assistant}")
            out.append(cand)
            if at is not None:
                cand.dates = annotate(text, at)[1]
            return out
    for sent in _SPLIT_SENT.split(text):
        sent = _DISCOURSE.sub("", sent.strip()).strip()
        if not sent:
            continue
        explicit = False
        m = _FORGET.match(_TRAIL.sub("", sent))
        if m:  # what to forget, worded as the memory was; sleep archives the memories it matches
            rest = m.group("rest").strip()
            found = _structured(rest)
            slot = _slot(rest)
            subject, value = (found.subject, found.value) if found is not None else (slot[:2] if slot else (None, None))
            out.append(Candidate(f"Forget: {rest}.", "forget", subject, value, embed_text=rest))
            continue
        m = _EXPLICIT.match(sent)
        if m:
            sent, explicit = m.group("rest").strip(), True
        body = _TRAIL.sub("", sent)
        if not body:
            continue
        answer = prev_assistant or last_answer
        if answer and is_feedback(body) and not explicit:  # reflection: what did the user correct, and what to change
            out.append(Candidate(lesson_from_feedback(body, answer)[0], "lesson", embed_text=body,
                                 explicit=explicit, memory_class="instruction"))
            continue
        label = classify(body)
        if explicit and label.label != INSTRUCTION and _STANDING.search(body) and not _FIRST_PERSON_FACT.match(body):
            label = Label(INSTRUCTION)  # "remember: metric units only" is how to answer, from now on
        elif explicit and label.label in (REQUEST, CHATTER, HYPOTHETICAL) and not _QUESTION_START.match(body):
            label = Label(USER_FACT, identity=label.identity)
        names = kin_names(body)  # true even inside a request or a hypothetical ("a gift for my wife Anjali?")
        for cand in names:
            cand.explicit = explicit
        if label.label in (REQUEST, CHATTER, HYPOTHETICAL):
            out += names
            continue
        dated, dates = annotate(body, at) if at is not None else (body, None)
        found: list[Candidate] = []
        if label.label == INSTRUCTION:
            found.append(Candidate(f"Instruction from the user: {dated.rstrip('?')}.", "instruction",
                                   embed_text=body))
        elif label.label == TEMPORARY:
            cand = Candidate(f"For now: {dated}.", "fact", embed_text=body)
            cand.person = label.person
            if at is not None:
                cand.expires_at = at + (label.expires_days or 3.0) * DAY
            found.append(cand)
        elif label.label == OTHER_FACT:
            who = label.person or "someone"
            subject = None
            mm = re.search(r"\b(?:lives|is living|moved) (?:in|to) (?P<val>[^,;]+)$", body, re.I)
            if mm:
                subject = f"{_norm_key(who)}.home"
            told = _first_person(dated)
            told = told[0].upper() + told[1:] if told != dated else f"About {who}: {dated}"
            found.append(Candidate(f"{told}.", "fact", subject,
                                   _clean_value(mm.group("val")) if mm else None, embed_text=body))
            found[-1].person = who
        elif _MOVED_NOWHERE.search(body) and not (_slot(body) or _structured(body)):
            # "actually we moved again": the old home no longer holds, though the new one is not named;
            # keyed as the home, it supersedes the old value (history kept) until a place is said
            found.append(Candidate(f"The user has moved; the new home was not named yet (said: \"{dated}\").",
                                   "fact", "user.home", None, embed_text=f"where I live: I moved. {body}"))
        else:
            parts = [c.strip() for c in _SPLIT_CLAUSE.split(body) if c.strip()]
            structured = [_structured(_DISCOURSE.sub("", p).strip()) for p in parts]
            found += [c for c in structured if c is not None]
            if not found or any(c is None for c in structured):
                if len(words) >= 2:
                    # part of the sentence fits no pattern: the whole sentence is the memory (its clauses
                    # hold each other's values), keyed by the first structured clause or slot it has
                    whole = Candidate(f"User: {dated}.", "fact", embed_text=body)
                    slot = _slot(body)
                    if found:
                        first = found.pop(0)
                        slot = (first.subject, first.value, first.embed_text or first.text)
                    if slot is not None and not any(c.subject == slot[0] for c in found):
                        # the whole sentence is the memory; the slot keys it for supersession, and its
                        # canonical wording is embedded beside it ("where do I live?" ~ "I live in Vejle")
                        whole.subject, whole.value, whole.embed_text = slot[0], slot[1], f"{slot[2]} {body}"
                    found.append(whole)
        for cand in found:
            cand.explicit = explicit
            cand.dates = dates
            cand.memory_class = _memory_class(cand, label)
            cand.corrects = bool(_CORRECTION.search(body))
            out.append(cand)
        out += [c for c in names if not any(f.subject == c.subject for f in found)]
    return out


LLM_PROMPT = (
    "You maintain a long-term memory about a user. Read the conversation below and reply with JSON only, "
    'an object {"memories": [...]}. Each memory is one whole fact in a short third-person sentence that keeps its '
    "value, the people involved and any date (resolve words like 'yesterday' against the message date). Include: "
    "facts about the user; facts about other people (set \"about\" to who, e.g. \"sister\"); standing "
    "instructions about how to answer (kind \"instruction\"); temporary states (kind \"temporary\", with "
    "expires_in_days); and lessons (kind \"lesson\") only where the user criticised or corrected one of the "
    "assistant's answers (what should the assistant change?). Leave out questions, requests for one answer, "
    "hypotheticals and small talk. A short answer (\"yep\", \"nope, dentist\") answers the assistant's preceding "
    "question. subject is a snake_case key such as \"user.home\" so that a newer value replaces an older one. "
    "identity is true for name, home, family, health and allergies. importance is 1-10. source is the [number] "
    "of the message the memory comes from.\n\nConversation:\n"
)

#: the JSON schema the backend is asked to follow (``response_format``); replies are validated against it
MEMORY_SCHEMA = {
    "type": "object",
    "properties": {"memories": {"type": "array", "items": {
        "type": "object",
        "properties": {
            "text": {"type": "string", "minLength": 1},
            "kind": {"enum": ["fact", "preference", "instruction", "temporary", "lesson"]},
            "about": {"type": "string"},
            "subject": {"type": ["string", "null"]},
            "value": {"type": ["string", "number", "null"]},
            "identity": {"type": "boolean"},
            "importance": {"type": "number", "minimum": 1, "maximum": 10},
            "expires_in_days": {"type": ["number", "null"], "minimum": 0},
            "source": {"type": ["integer", "string", "null"]},
        },
        "required": ["text", "kind"],
    }}},
    "required": ["memories"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "ltml_memories", "schema": MEMORY_SCHEMA}}


def _json_items(reply: str) -> list | None:
    """The list of memories in a reply: {"memories": [...]} (schema-following backends) or a bare list."""
    try:
        obj = json.loads(reply)
    except ValueError:
        obj = None
    if obj is None:
        m = re.search(r"\{.*\}|\[.*\]", reply, re.S)
        if not m:
            return None
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            m = re.search(r"\[.*\]", reply, re.S)
            try:
                obj = json.loads(m.group(0)) if m else None
            except ValueError:
                return None
    if isinstance(obj, dict):
        obj = obj.get("memories")
    return obj if isinstance(obj, list) else None


def _valid_item(item) -> bool:
    import jsonschema

    try:
        jsonschema.validate(item, MEMORY_SCHEMA["properties"]["memories"]["items"])
    except jsonschema.ValidationError:
        return False
    return bool(item["text"].strip())


def parse_llm_items(reply: str) -> list[Candidate] | None:
    """Parse and validate the LLM's memories; None when the reply is not usable (the rules take over)."""
    items = _json_items(reply)
    if items is None:
        return None
    out = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("text"), str) or not it["text"].strip():
            continue
        it = {"kind": "fact", **{k: v for k, v in it.items() if v is not None or k in ("subject", "value")}}
        if it.get("kind") not in MEMORY_SCHEMA["properties"]["memories"]["items"]["properties"]["kind"]["enum"]:
            it["kind"] = "fact"
        if not _valid_item(it):
            continue
        kind = {"temporary": "fact"}.get(it["kind"], it["kind"])
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
        about = it.get("about")
        if isinstance(about, str) and about.strip().lower() not in ("", "user", "the user", "me"):
            cand.person = about.strip()
        if kind in ("instruction", "lesson"):
            cand.memory_class = "instruction"
        elif it["kind"] == "temporary":
            cand.memory_class = "temporary"
            cand.expires_days = float(it.get("expires_in_days") or 3.0)
        elif it.get("identity") is True or (cand.subject and _IDENTITY_SUBJECTS.match(cand.subject)):
            cand.memory_class = "identity"
        out.append(cand)
    return out


def extract_llm(messages: list[tuple[str, str]], backend) -> list[Candidate] | None:
    """Ask ``backend`` (a :class:`memlm.apps.chat_backends.ChatBackend`) to extract memories.

    A remote backend answers through :class:`memlm.core.openai_client.OpenAIClient` as one
    non-streamed request, retried on 5xx/429/timeouts; any failure raises and the caller
    falls back to the rule-based extractor."""
    lines = []
    for i, msg in enumerate(messages):  # (role, content) or (role, content, unix time written)
        role, content = msg[0], msg[1]
        when = f" (written {iso_day(msg[2])})" if len(msg) > 2 and msg[2] else ""
        lines.append(f"[{i}] {role}: {content}{when}")
    convo = "\n".join(lines)
    prompt = [{"role": "user", "content": LLM_PROMPT + convo}]
    client = getattr(backend, "client", None)
    if client is not None and hasattr(client, "complete"):  # an OpenAI-compatible server: ask for the schema
        reply = client.complete(prompt, max_tokens=1024, temperature=0.0, response_format=RESPONSE_FORMAT)
    else:
        reply = backend.chat(prompt, max_tokens=1024, temperature=0.0)
    return parse_llm_items(reply)

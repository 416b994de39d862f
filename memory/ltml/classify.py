"""What a user sentence is: a fact about the user, about someone else, a standing instruction,
a temporary state, a question or request, a hypothetical, or chatter.

Rule signals only (no model): spaCy's English models are not on PyPI (they install from
GitHub releases, which this project cannot reach), and a classifier trained on a few hundred
sentences written here would mostly relearn these same cues. Every sentence is a candidate;
what is not a fact stays reachable through the raw log that wake searches (see wake.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DAY = 86400.0

USER_FACT, OTHER_FACT, INSTRUCTION, TEMPORARY, REQUEST, HYPOTHETICAL, CHATTER = (
    "user_fact", "other_fact", "instruction", "temporary", "request", "hypothetical", "chatter")

RELATIONS = (
    "sister|brother|mum|mom|mother|dad|father|parents|wife|husband|partner|girlfriend|boyfriend|fiance|fiancee|son|"
    "daughter|kids|children|child|friend|best friend|boss|manager|colleague|coworker|aunt|uncle|grandma|grandmother|"
    "grandpa|grandfather|grandparents|cousin|neighbour|neighbor|niece|nephew|flatmate|roommate|in-laws|sibling"
)
_OTHER = re.compile(rf"^(?:my|our) (?P<who>(?:older |younger |little |big |eldest |youngest )?(?:{RELATIONS}))(?:'s)?\b(?!,? (?:[a-z]+,? )?and (?:i|me)\b)", re.I)
_OTHER_NAMED = re.compile(r"^(?!(?:We|It|This|That|There|Everything|Nothing|Work|Life|Today|Actually)\b)"
                          r"(?P<who>[A-Z][a-z]+) (?:is|was|lives|works|has|loves|hates|got|moved|just|will|studies|plays)\b")
PETS = ("dog|cat|rabbit|puppy|kitten|parrot|hamster|horse|pony|pet|tortoise|turtle|budgie|canary|cockatiel|ferret|"
        "guinea pig|goldfish|gecko|lizard|snake|hen|greyhound|whippet|lurcher|terrier|spaniel|collie|labrador|"
        "retriever|poodle|beagle|pug|dachshund|husky|sheepdog|tabby")
#: "my partner Idris", "our dog Pilot", "a greyhound, Flara": a named family member or pet is part of who the
#: user is (the name after a bare article is only a pet's: "a sister, Mia" is rare and "a cat, Monday" is excluded
#: by the caller's stop words)
_NAMED_KIN = re.compile(rf"\b(?:(?i:my|our) (?i:{RELATIONS}|{PETS})|(?i:an?|my|our) (?:(?i:new|rescue|little|old|"
                        rf"young|baby) )?(?i:{PETS})),? (?:(?i:called|named) )?[A-Z][a-z]+")
_IDENTITY_WORDS = re.compile(
    rf"\b(?:my name|call me|allerg\w*|vegetarian|vegan|diabetic|diabetes|asthma|coeliac|celiac|gluten|lactose|"
    rf"epilep\w*|pregnant|medication|born|birthday|live in|living in|moved to|never eat|don't eat|do not eat|halal|"
    rf"kosher|i teach|i work (?:as|at|for)|i'm a|i am a|i've been a|(?:{RELATIONS})(?:'s name| is called| is named))\b",
    re.I)

_HYPOTHETICAL = re.compile(
    r"^(?:if|suppose|imagine|what if|in theory|hypothetically)\b|\b(?:i'd|i would|i might|we'd|we would|we might|"
    r"maybe i'll|maybe we'll|thinking (?:about|of)|considering|wondering whether|wondering if|not sure if|"
    r"might (?:move|take|quit|buy|go))\b", re.I)
_STANDING = re.compile(
    r"\b(?:always|never|from now on|in (?:the )?future|going forward|every time|each time|any ?more|no more|stop|"
    r"keep (?:it|them|answers|replies|responses|things|your)|don't (?:use|call|add|give|send|include|put|mention|"
    r"suggest|recommend)|do not|no (?:emojis?|emoji|bullet points?|lists?|jargon|exclamation|markdown|headers)|"
    r"(?:answers?|reply|replies|responses?|respond|write) (?:in|with|without)|"
    r"(?:metric|imperial|swedish|european|british|american|us|uk) units|use (?:metric|celsius|fahrenheit|imperial|miles|km|british|"
    r"american|uk|us)|call me|address me|refer to me|remind me|shorter|briefer|concise|plain text)\b", re.I)
_INSTRUCTION_START = re.compile(
    r"^(?:please|pls|can you|could you|would you|will you|remember|note|from now on|in future|going forward|always|"
    r"never|don't|do not|stop|keep|no|avoid|use|call me|i (?:prefer|want|like) (?:short|long|brief|concise|detailed|"
    r"answers|replies|responses|metric|bullet))\b", re.I)
_REQUEST = re.compile(
    r"^(?:please |pls |ok |okay |so |now )?(?:give|tell|write|make|show|find|suggest|recommend|help|explain|list|"
    r"translate|summari[sz]e|plan|book|draft|create|generate|compose|check|compare|calculate|convert|describe|"
    r"remind|send|fix|rewrite|edit|draw|name|pick|choose|brainstorm|can you|could you|would you|will you|"
    r"i need (?:a|an|some|you)|i want (?:a|an|you|to know)|any (?:ideas|tips|suggestions)|how about|what about)\b",
    re.I)
_QUESTION = re.compile(
    r"^(?:what|how|why|when|where|who|whom|whose|which|do|does|did|is|are|was|were|can|could|would|will|should|"
    r"shall|may|have you|has)\b", re.I)
_TEMPORARY = re.compile(
    r"\b(?:tonight|today|this (?:morning|afternoon|evening|week|weekend)|right now|at the moment|tomorrow|"
    r"for (?:the|this) (?:day|week|weekend)|later today|this coming)\b", re.I)
_STATE = re.compile(
    r"\b(?:i'm|i am|i feel|feeling|i've got a|i have a) (?:so |really |a bit |very |kind of )?(?:tired|sick|ill|"
    r"exhausted|stressed|busy|hungry|bored|sleepy|sore|hungover|nervous|anxious|cold|headache|migraine|fever)\b",
    re.I)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|i've|i'll|i'd|me|my|mine|we|we're|we've|we'll|our|us)\b", re.I)
_CHATTER = re.compile(
    r"^(?:hi|hello|hey|thanks|thank you|cheers|good (?:morning|night|evening|afternoon)|bye|goodbye|see you|lol|"
    r"haha|ok|okay|cool|nice|great|awesome|sure|wow|hmm|interesting|fair enough|makes sense|got it|perfect)\b",
    re.I)
_FEEDBACK = re.compile(
    r"^(?:(?:that's|that is|this is|it's|way|much|far) )?(?:too (?:long|short|wordy|verbose|formal|casual|much|"
    r"technical|vague))\b|^(?:that's|that is|this is|it's) (?:wrong|not right|incorrect|not what i (?:asked|wanted)|"
    r"not true)|^(?:no|nope|wrong),? (?:it's|it is|that's|the answer is|actually)\b|^(?:shorter|less|fewer|"
    r"no (?:bullet points?|lists?|emojis?|markdown))\b|^(?:please )?(?:don't|do not|stop) (?:use|using|add|adding|"
    r"give|giving|put|putting|say|saying|repeat|repeating)\b|\byou (?:got|have) (?:it|that) wrong\b|"
    r"\bi (?:said|told you|already told you)\b",
    re.I)

#: hours a temporary state lasts, by the word that made it temporary
_EXPIRY = [(re.compile(r"\b(?:tonight|today|this (?:morning|afternoon|evening)|right now|later today)\b", re.I), 1.0),
           (re.compile(r"\btomorrow\b", re.I), 2.0),
           (re.compile(r"\bthis (?:week|weekend|coming)\b|\bfor (?:the|this) (?:week|weekend)\b", re.I), 7.0)]


@dataclass
class Label:
    label: str
    person: str | None = None  # for OTHER_FACT: "sister", or a name
    expires_days: float | None = None  # for TEMPORARY
    identity: bool = False  # name, home, family, health, allergies: protected from decay


def expires_days(sentence: str) -> float:
    for pat, days in _EXPIRY:
        if pat.search(sentence):
            return days
    return 3.0


_PAST = re.compile(
    r"\b(?:went|was|were|had|did|got|came|left|ran|swam|won|lost|made|took|gave|met|saw|bought|sold|told|found|"
    r"caught|wrote|drove|flew|rode|ate|drank|broke|fell|began|sang|threw|spent|paid|sent|built|held|kept|"
    r"[a-z]{3,}ed)\b", re.I)
#: adjectives in -ed that describe a state ("I'm tired today"), not an event
_STATE_ED = re.compile(r"\b(?:tired|stressed|bored|worried|excited|exhausted|scared|annoyed|confused|"
                       r"overwhelmed|relaxed|depressed|closed|booked|packed|crowded|delayed|cancelled|canceled)\b", re.I)
_NOT_PAST = re.compile(
    r"\b(?:i'm|i am|we're|we are|is|are|am|will|i'll|we'll|going to|gonna|have to|need to|tomorrow|tonight|"
    r"later)\b", re.I)


def _past_event(body: str) -> bool:
    """ "The app went live today" is a dated event that stays true, not a state that will pass."""
    past = [w for w in _PAST.findall(body) if not _STATE_ED.fullmatch(w)]
    return bool(past) and not _NOT_PAST.search(body)


def is_feedback(sentence: str) -> bool:
    """Feedback on the assistant's last answer ("too long", "no bullet points", "that's wrong, it's X")."""
    return bool(_FEEDBACK.search(sentence.strip()))


def classify(sentence: str) -> Label:
    s = sentence.strip()
    body = s.rstrip(" .!")
    words = re.findall(r"[A-Za-z0-9']+", body)
    if not words:
        return Label(CHATTER)
    if _STANDING.search(body) and (_INSTRUCTION_START.match(body)
                                   or re.search(r"\b(?:answers?|replies|responses|your)\b", body, re.I)):
        if not _QUESTION.match(body) or re.match(r"^(?:can|could|would|will) you\b", body, re.I):
            return Label(INSTRUCTION)
    if s.endswith("?") or _QUESTION.match(body):
        return Label(REQUEST)
    if _REQUEST.match(body):
        return Label(REQUEST)
    if _HYPOTHETICAL.search(body):
        return Label(HYPOTHETICAL)
    if _CHATTER.match(body) and len(words) <= 4:
        return Label(CHATTER)
    if re.match(r"^(?:you|your|it|that|this|there)\b", body, re.I) and not re.search(r"\b(?:my|i|me)\b", body, re.I):
        return Label(CHATTER)  # about the assistant or the topic, not about anybody's life
    identity = bool(_IDENTITY_WORDS.search(body) or _NAMED_KIN.search(body))
    m = _OTHER.match(body) or _OTHER_NAMED.match(body)
    person = None
    if m and not re.search(r"\b(?:name is|is called|is named|'s name)\b", body, re.I):
        who = m.group("who")
        person = who.lower() if m.re is _OTHER else who
    if (_TEMPORARY.search(body) and not _past_event(body)) or _STATE.search(body):
        if not re.search(r"\b(?:always|every|usually|since|years?|allergic)\b", body, re.I):
            return Label(TEMPORARY, person=person, expires_days=expires_days(body))
    if person:  # "my husband Jonas works nights": the fact is his (the name becomes its own memory: extract.py)
        return Label(OTHER_FACT, person=person)
    if _FIRST_PERSON.search(body) and len(words) >= 2:
        return Label(USER_FACT, identity=identity)
    if len(words) >= 4 and not _CHATTER.match(body):
        return Label(USER_FACT, identity=identity)  # subject-less statements ("moved to Leeds in May") are the user's
    return Label(CHATTER)

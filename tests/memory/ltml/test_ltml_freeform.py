"""LTML on free conversation (issue 15): one test per failure class, with examples written here."""
from __future__ import annotations

import sqlite3

import pytest
from ltml_helpers import DAY, T0, log_session

from memlm.memory.ltml.classify import (
    CHATTER, HYPOTHETICAL, OTHER_FACT, REQUEST, TEMPORARY, USER_FACT, classify,
)
from memlm.memory.ltml.dates import annotate, resolve
from memlm.memory.ltml.embeddings import HashEmbedder
from memlm.memory.ltml.extract import extract_rules
from memlm.memory.ltml.sleep import sleep
from memlm.memory.ltml.store import MIGRATIONS, SCHEMA_VERSION, Store
from memlm.memory.ltml.wake import WakeConfig, rank, wake

# 2023-11-14 is a Tuesday (T0 = 1_700_000_000)


def _texts(cands):
    return [c.text for c in cands]


def _convo(store, turns, day):
    """Log alternating (role, text) turns as one session."""
    at = T0 + day * DAY
    sid = store.start_session("test", at=at)
    return [store.log(sid, role, text, at=at + i) for i, (role, text) in enumerate(turns)]


# -- stated facts that were never extracted ---------------------------------------------------
def test_short_answers_are_resolved_against_the_assistants_question():
    (c,) = extract_rules("nope, dentist", prev_assistant="Is the appointment with the vet?", at=T0)
    assert c.text == 'Asked "Is the appointment with the vet?", user: nope, dentist.'
    (c,) = extract_rules("Tomás, by the way", prev_assistant="Lovely! What's your son called?", at=T0)
    assert "Tomás" in c.text and c.subject == "user.son" and c.memory_class == "identity"
    (c,) = extract_rules("yep", prev_assistant="Nice. Are you still in Aarhus?", at=T0)
    assert (c.subject, c.value, c.memory_class) == ("user.home", "Aarhus", "identity")
    assert extract_rules("yep") == []  # nothing to confirm without a question


def test_facts_inside_longer_messages_we_and_ill_sentences_are_candidates():
    msg = "ugh, long day. Can you suggest a quick dinner? We'll be in Rome for two weeks in May. I'll start at Globex on Monday."
    texts = _texts(extract_rules(msg, at=T0))
    assert any("Rome for two weeks in May" in t for t in texts)
    assert any("Globex" in t for t in texts)
    assert not any("quick dinner" in t for t in texts)  # the request is not a memory


def test_a_clause_keeps_its_co_agents_and_its_second_half():
    (c,) = extract_rules("My sister and I ran the marathon.", at=T0)
    assert "My sister and I ran the marathon" in c.text and c.person is None  # the user did it, with the sister
    (c,) = extract_rules("It's a gift from my aunt; it stands for courage.", at=T0)
    assert "gift from my aunt; it stands for courage" in c.text


# -- instructions that were dropped -------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Please keep answers under 100 words.", "Can you always use metric units?", "remember, no emojis",
    "From now on call me Lu.", "no bullet points please",
])
def test_instructions_with_please_can_you_and_remember_comma_are_kept(text):
    (c,) = extract_rules(text, at=T0)
    assert c.kind == "instruction" and c.memory_class == "instruction"


# -- false memories ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, label", [
    ("give me a recipe without nuts", REQUEST),
    ("What should I cook tonight?", REQUEST),
    ("if I took the job I'd move", HYPOTHETICAL),
    ("I might move to Lisbon if the rent keeps rising", HYPOTHETICAL),
    ("my parents visit tonight", TEMPORARY),
    ("I'm so tired today", TEMPORARY),
    ("my sister lives in Ghent", OTHER_FACT),
    ("You should never give up.", CHATTER),
    ("thanks!", CHATTER),
    ("I never eat pork.", USER_FACT),
])
def test_sentence_classes(text, label):
    assert classify(text).label == label


def test_requests_hypotheticals_and_should_sentences_are_not_memories():
    for text in ("give me a recipe without nuts", "if I took the job I'd move", "You should never give up."):
        assert extract_rules(text, at=T0) == [], text
    assert not [c for c in extract_rules("I always think you should never skip breakfast.", at=T0) if c.kind == "lesson"]


def test_other_peoples_facts_are_kept_as_theirs_and_do_not_answer_questions_about_the_user(tmp_path):
    (c,) = extract_rules("my sister lives in Ghent", at=T0)
    assert c.person == "sister" and c.subject == "sister.home" and c.text == "The user's sister lives in Ghent."
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["my sister lives in Ghent", "I live in Leuven."], day=0)
    sleep(s, HashEmbedder(), now=T0 + DAY)
    home = [m for m in s.memories() if m.subject == "user.home"]
    assert [m.value for m in home] == ["Leuven"]  # the sister's city never became the user's home
    s.close()


def test_temporary_states_expire(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["my parents visit tonight", "I have a tortoise named Gus."], day=0)
    sleep(s, emb, now=T0 + 0.5 * DAY)
    (temp,) = [m for m in s.memories() if m.memory_class == "temporary"]
    assert temp.expires_at == pytest.approx(T0 + DAY)
    assert "parents" in wake(s, emb, "who is visiting?", now=T0 + 0.5 * DAY, touch=False).text
    later = wake(s, emb, "who is visiting?", now=T0 + 3 * DAY, touch=False)
    assert "parents" not in later.text and "Gus" in later.text  # expired: neither the memory nor its message
    assert all(it.memory.id != temp.id for it in later.items)
    sleep(s, emb, now=T0 + 3 * DAY)
    assert s.get(temp.id).archived and s.history(temp.id)[-1][2] == "expire"
    s.close()


def test_lessons_come_only_from_feedback_on_an_answer(tmp_path):
    (c,) = extract_rules("too long, just the ingredients", prev_assistant="Here is a long recipe ...", at=T0)
    assert c.kind == "lesson" and c.memory_class == "instruction"
    assert all(c.kind != "lesson" for c in extract_rules("too long, just the ingredients", at=T0))
    (c,) = extract_rules("that's wrong, it's 78 degrees", prev_assistant="Ethanol boils at 87 degrees.", at=T0)
    assert c.kind == "lesson" and "78" in c.text
    # in sleep, the preceding assistant message comes from the log
    s = Store(tmp_path / "m.sqlite")
    _convo(s, [("user", "How do I make hummus?"), ("assistant", "1. Soak chickpeas\n2. Blend"),
               ("user", "no bullet points please, I read these aloud")], day=0)
    sleep(s, HashEmbedder(), now=T0 + DAY)
    (lesson,) = [m for m in s.memories() if m.kind == "lesson"]
    assert "bullet points" in lesson.text
    s.close()


# -- corrections ------------------------------------------------------------------------------
@pytest.mark.parametrize("old, new, gone, kept", [
    ("I drive to work, usually around eight.", "I take the train to work now.", "drive", "train"),
    ("I live in York.", "Actually we moved again, we're in Vejle now.", "York", "Vejle"),
    ("I got the job! Starting at Brightloop in March.", "I'm not at Brightloop anymore, I joined Nubo.", "Starting", "Nubo"),
])
def test_corrections_supersede_the_old_value_with_history(tmp_path, old, new, gone, kept):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, [old], day=0)
    sleep(s, emb, now=T0 + DAY)
    log_session(s, [new], day=10)
    sleep(s, emb, now=T0 + 11 * DAY)
    active = " ".join(m.text for m in s.memories())
    assert kept in active and gone not in active
    (older,) = [m for m in s.memories(active_only=False) if m.superseded_by is not None]
    assert any(h[2] == "supersede" for h in s.history(older.id))
    block = wake(s, emb, "how do I get to work, where do I live, where do I work?", now=T0 + 11 * DAY, touch=False)
    assert kept in block.text and gone not in block.text  # the stale episode is hidden too
    s.close()


# -- whole facts, dated -------------------------------------------------------------------------
def test_relative_times_are_resolved_against_the_session_date():
    at = T0  # Tuesday 2023-11-14
    got = {w: d.isoformat() for w, d in resolve("yesterday, last Friday, two weeks ago, next Monday, tomorrow", at)}
    assert got == {"yesterday": "2023-11-13", "last Friday": "2023-11-10", "two weeks ago": "2023-10-31",
                   "next Monday": "2023-11-20", "tomorrow": "2023-11-15"}
    text, dates = annotate("We ran the half marathon last Sunday.", at)
    assert text == "We ran the half marathon last Sunday (= 2023-11-12)." and dates == "2023-11-12"
    c, name = extract_rules("Our dog Pilot turned five yesterday.", at=at)  # the event, and the dog's name
    assert "yesterday (= 2023-11-13)" in c.text and c.dates == "2023-11-13"
    assert (name.subject, name.value, name.memory_class) == ("user.dog.name", "Pilot", "identity")


# -- decay: protected classes, backlog --------------------------------------------------------
def test_identity_facts_and_instructions_survive_400_idle_days_without_remember_that(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["My partner is called Idris.", "I'm allergic to sesame.", "Please keep answers short.",
                    "I watched a documentary about octopuses."], day=0)
    sleep(s, emb, now=T0 + DAY)
    assert not any(m.explicit for m in s.memories())
    sleep(s, emb, now=T0 + 401 * DAY)
    kept = " ".join(m.text for m in s.memories())
    assert "Idris" in kept and "sesame" in kept and "answers short" in kept and "octopuses" not in kept
    s.close()


# -- never worse than the raw log -----------------------------------------------------------------
def test_wake_reaches_raw_messages_that_consolidation_missed_or_has_not_seen(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    # read as a request, so no memory is extracted, yet it states where the key is
    log_session(s, ["Remind me to tell Ana the spare key is under the blue flowerpot"], day=0)
    sleep(s, emb, now=T0 + DAY)
    assert s.memories() == []
    log_session(s, ["The wifi password is on the fridge magnet."], day=2)  # not slept yet
    a = wake(s, emb, "where is the spare key?", now=T0 + 2 * DAY, touch=False)
    assert "flowerpot" in a.text and any(it.memory.kind == "episode" for it in a.items)
    assert "fridge magnet" in wake(s, emb, "what is the wifi password?", now=T0 + 2 * DAY, touch=False).text
    assert WakeConfig(episodes=False) and "flowerpot" not in wake(
        s, emb, "where is the spare key?", WakeConfig(episodes=False), now=T0 + 2 * DAY, touch=False).text
    s.close()


def test_a_memory_wins_over_the_episode_it_came_from(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    (iid,) = log_session(s, ["I have a parrot named Kiwi."], day=0)
    sleep(s, emb, now=T0 + DAY)
    ranked = rank(s, emb, "what is my parrot called?", now=T0 + DAY)
    kiwi = [it for it in ranked if "Kiwi" in it.memory.text]
    assert len(kiwi) == 1 and kiwi[0].memory.kind == "fact" and kiwi[0].memory.provenance == [iid]


def test_the_budget_is_filled_by_tokens_not_a_fixed_count(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    things = ["passport", "umbrella", "torch", "stapler", "guitar", "kettle"]
    places = ["attic", "garage", "cupboard", "drawer", "basement"]
    log_session(s, [f"I keep the {t} in the {p} beside the {t}-shaped {p} lamp." for t in things for p in places], day=0)
    sleep(s, emb, now=T0 + DAY)
    assert len(s.memories()) == 30  # distinct enough not to merge
    small = wake(s, emb, "where do I keep things?", WakeConfig(budget_tokens=200), now=T0 + DAY, touch=False)
    big = wake(s, emb, "where do I keep things?", WakeConfig(budget_tokens=500), now=T0 + DAY, touch=False)
    assert len(big.items) > 10 and len(big.items) > 2 * len(small.items) - 2  # the old wake stopped at 8 + 2
    for inj, budget in ((small, 200), (big, 500)):  # filled until the next line would not fit
        assert budget - max(it.tokens for it in inj.items) < inj.tokens <= budget
    s.close()


# -- migration ----------------------------------------------------------------------------------
def test_a_database_from_the_previous_schema_opens_and_gains_the_new_fields(tmp_path):
    path = tmp_path / "v3.sqlite"
    conn = sqlite3.connect(path)
    for version in (1, 2, 3):  # exactly what the v3 code created
        for stmt in MIGRATIONS[version].split(";"):
            if stmt.strip():
                conn.execute(stmt)
    conn.execute("INSERT INTO meta VALUES('schema_version', '3')")
    conn.execute("INSERT INTO memories(text, kind, subject, value, created_at, updated_at) "
                 "VALUES('The user lives in Oslo.', 'fact', 'user.home', 'Oslo', 1, 1)")
    conn.execute("INSERT INTO interactions(role, content, created_at) VALUES('user', 'I live in Oslo.', 1)")
    conn.commit()
    conn.close()
    with Store(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 4
        (m,) = s.memories()
        assert (m.text, m.memory_class, m.expires_at, m.person, m.dates, m.available_at) == (
            "The user lives in Oslo.", "ordinary", None, None, None, None)
        assert s.conn.execute("SELECT COUNT(*) FROM episode_vectors").fetchone() == (0,)
        sleep(s, HashEmbedder(), now=T0)  # and it works: the old log is consolidated and searchable
        assert "Oslo" in wake(s, HashEmbedder(), "where do I live?", now=T0, touch=False).text


# -- names in passing and explicit forgetting (issue 15, second pass) ---------------------------
@pytest.mark.parametrize("text, key, name", [
    ("My husband Tom and I went to the coast.", "user.husband", "Tom"),  # a co-agent, not the husband's fact
    ("my wife Priya works nights at the hospital", "user.wife", "Priya"),  # her fact, his family
    ("We adopted a whippet, Juno, last month.", "user.whippet.name", "Juno"),
    ("Can you find a gift for my brother Sam?", "user.brother", "Sam"),  # a request still names him
])
def test_a_name_given_in_passing_is_its_own_identity_memory(text, key, name):
    names = [c for c in extract_rules(text, at=T0) if c.subject == key]
    assert [(c.value, c.memory_class) for c in names] == [(name, "identity")]
    assert not [c for c in extract_rules(text, at=T0) if "gift" in c.text]  # the request itself is no memory
    (c,) = [c for c in extract_rules("My husband Tom and I went to the coast.", at=T0) if c.subject is None]
    assert c.person is None and "My husband Tom and I went" in c.text


def test_a_one_word_name_answering_whats_her_name_is_keyed_by_whom_the_user_mentioned(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    _convo(s, [("user", "We finally got a kitten!"), ("assistant", "How lovely! What's her name?"), ("user", "Mochi")], 0)
    sleep(s, emb, now=T0 + DAY)
    (m,) = s.by_subject("user.kitten.name")
    assert m.value == "Mochi" and m.memory_class == "identity"
    (c,) = extract_rules("Biscuit", prev_assistant="What's his name?", at=T0)  # nobody to attach it to
    assert c.subject is None and c.memory_class == "identity"
    sleep(s, emb, now=T0 + 401 * DAY)
    assert "Mochi" in " ".join(m.text for m in s.memories())
    s.close()


def test_forget_archives_the_matching_memory_with_history_even_when_protected(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["I live in Leeds.", "I'm allergic to peanuts.", "My partner is called Idris."], day=0)
    sleep(s, emb, now=T0 + DAY)
    log_session(s, ["Actually I live in York now."], day=2)
    log_session(s, ["Forget that I live in Leeds.", "please forget that I'm allergic to peanuts"], day=3)
    stats = sleep(s, emb, now=T0 + 4 * DAY)
    kept = " ".join(m.text for m in s.memories())
    assert stats["forgotten"] == 1 and "peanuts" not in kept  # Leeds was already history: York stays
    assert "York" in kept and "Idris" in kept
    (gone,) = [m for m in s.memories(active_only=False) if "peanuts" in m.text]
    assert gone.archived and [a for _h, mid, a, _d, _t in s.history(gone.id)][-1] == "forget"
    s.restore(gone.id)
    assert "peanuts" in " ".join(m.text for m in s.memories())
    assert all(c.kind != "forget" for c in extract_rules("forget it, never mind"))  # nothing named to forget
    s.close()


def test_ltml_forget_command_archives_by_id_and_rejects_inactive(tmp_path, capsys):
    from memlm.apps.ltml import main
    from memlm.core.errors import MemLMError

    db = tmp_path / "m.sqlite"
    s = Store(db)
    log_session(s, ["I'm allergic to sesame."], day=0)
    sleep(s, HashEmbedder(), now=T0 + DAY)
    (m,) = s.memories()
    s.close()
    assert main(["forget", "--db", str(db), str(m.id)]) == 0
    assert "forgot" in capsys.readouterr().out
    with Store(db) as s2:
        assert s2.memories() == [] and s2.history(m.id)[-1][2] == "forget"
    with pytest.raises(MemLMError, match="not active"):  # run_main prints it as one line and exits 2
        main(["forget", "--db", str(db), str(m.id)])


def test_a_past_event_on_the_day_is_dated_not_temporary():
    """ "went live today" happened; it must not expire (and hide its message) like "I'm sick today"."""
    for s in ("Harbour Health's patient app went live today.", "I finished the marathon today!"):
        assert classify(s).label == USER_FACT, s
    for s in ("I'm sick today.", "My parents visit tonight.", "The shop is closed tomorrow.",
              "I have a migraine this afternoon."):
        assert classify(s).label == TEMPORARY, s


def test_bm25_meets_inflections():
    from memlm.memory.ltml.lexical import bm25_scores, tokens

    assert tokens("celebrated launching sisters moved") == tokens("celebrate launch sister move")
    scores = bm25_scores("where did we celebrate?", ["We celebrated at Golden Lotus.", "I like tea.", "Rain again."])
    assert scores[0] > 0 and scores[1] == scores[2] == 0


def test_we_moved_again_without_a_place_retires_the_old_home_with_history(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["We live in Leeds."], day=0)
    sleep(s, emb, now=T0 + DAY)
    log_session(s, ["Actually we moved again."], day=30)
    sleep(s, emb, now=T0 + 31 * DAY)
    (home,) = [m for m in s.memories() if m.subject == "user.home"]
    assert home.value is None and "not named" in home.text and home.memory_class == "identity"
    (leeds,) = [m for m in s.memories(active_only=False) if m.value == "Leeds"]
    assert leeds.superseded_by == home.id and any(h[2] == "supersede" for h in s.history(leeds.id))
    block = wake(s, emb, "where do I live?", now=T0 + 31 * DAY, touch=False).text
    assert "moved" in block and "Leeds" not in block  # the old value is history, not the answer
    log_session(s, ["We're in York now."], day=40)
    sleep(s, emb, now=T0 + 42 * DAY)
    (home,) = [m for m in s.memories() if m.subject == "user.home"]
    assert home.value == "York"
    # "we" is the user (with family), never a person called "We"; moving furniture is not moving home
    assert [c.subject for c in extract_rules("We moved to Bristol.", at=T0)] == ["user.home"]
    assert all(c.subject is None and c.person is None for c in extract_rules("We moved the sofa.", at=T0))
    s.close()


def test_remember_after_a_question_is_an_instruction_not_an_answer():
    q = "How many people work in the shop?"
    for text, needle in [("Remember, no emojis.", "no emojis"), ("remember: metric units only", "metric"),
                         ("Remember: answers in Swedish units, grams not cups.", "grams")]:
        (c,) = extract_rules(text, prev_assistant=q, at=T0)
        assert c.kind == "instruction" and c.memory_class == "instruction" and needle in c.text, text
    (c,) = extract_rules("three, plus me", prev_assistant=q, at=T0)
    assert c.kind == "fact" and c.text.startswith('Asked "How many people work in the shop?"')
    assert extract_rules("Remember that I never eat pork.", at=T0)[0].kind == "fact"  # a fact, said to be kept


def test_an_event_of_the_day_stays_reachable_after_the_day(tmp_path):
    """ "swam her first length today" is not a temporary state: its message must not vanish with the day."""
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["Zosia swam her first full length of the pool today, no floats.", "I'm sick today."], day=0)
    sleep(s, emb, now=T0 + 0.5 * DAY)
    block = wake(s, emb, "when did Zosia swim her first full length? am I sick?", now=T0 + 30 * DAY, touch=False)
    assert "swam her first full length" in block.text and "(2023-11-14)" in block.text
    assert "sick" not in block.text  # the temporary state expired, its message with it
    kept = wake(s, emb, "am I sick?", WakeConfig(hide_expired=False), now=T0 + 30 * DAY, touch=False)
    assert "sick" in kept.text  # unless asked to keep expired messages reachable
    s.close()

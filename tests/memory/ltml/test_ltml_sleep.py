"""LTML sleep: extraction, dedupe, supersession, importance, forgetting, idempotence, crash safety."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ltml_helpers import DAY, T0, log_session

from memlm.memory.ltml.embeddings import HashEmbedder
from memlm.memory.ltml.extract import extract_rules, parse_llm_items
from memlm.memory.ltml.sleep import PAUSE_ENV, SleepConfig, sleep
from memlm.memory.ltml.store import Store

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hi there!", []),
        ("What is my favourite colour?", []),
        ("My favourite colour is blue.", [("The user's favourite colour is blue.", "preference", "user.favorite_color", "blue")]),
        ("I live in Paris and I work at Acme.", [("The user lives in Paris.", "fact", "user.home", "Paris"),
                                                ("The user works at Acme.", "fact", "user.employer", "Acme")]),
        ("I moved to Berlin last month.", [("The user lives in Berlin.", "fact", "user.home", "Berlin")]),
        ("I have a dog named Rex.", [("The user has a dog named Rex.", "fact", "user.dog.name", "Rex")]),
        ("I can't stand olives.", [("The user dislikes olives.", "preference", "user.likes.olives", "dislike")]),
        # a standing instruction, not a lesson: lessons come only from feedback on an answer
        ("Next time, always answer in French.",
         [("Instruction from the user: Next time, always answer in French.", "instruction", None, None)]),
    ],
)
def test_rule_extraction(text, expected):
    got = [(c.text, c.kind, c.subject, c.value) for c in extract_rules(text)]
    assert got == expected


def test_explicit_requests_and_assistant_messages():
    (c,) = extract_rules("Please remember that my sister's name is Anna.")
    assert c.explicit and c.subject == "user.sister" and c.value == "Anna"
    assert extract_rules("My name is Bot and I live in the cloud.", role="assistant") == []


def _active(store):
    return {m.subject or m.text: m for m in store.memories()}


def test_near_duplicates_merge_with_counts_and_provenance(tmp_path, minilm):
    s = Store(tmp_path / "m.sqlite")
    a = log_session(s, ["I spent the weekend restoring an old sailing boat with my father."], day=0)
    b = log_session(s, ["I spent the weekend restoring an old sailing boat with my dad."], day=2)
    log_session(s, ["My favourite colour is blue.", "I live in Oslo."], day=3)
    log_session(s, ["my favorite color is Blue!"], day=4)
    stats = sleep(s, minilm, now=T0 + 5 * DAY)
    mems = s.memories()
    boats = [m for m in mems if "boat" in m.text]
    assert len(boats) == 1 and boats[0].mention_count == 2 and set(boats[0].provenance) == {a[0], b[0]}
    assert "dad" in boats[0].text  # the newer wording wins, the old one is in history
    assert any(h[2] == "merge" for h in s.history(boats[0].id))
    colour = [m for m in mems if m.subject == "user.favorite_color"]
    assert len(colour) == 1 and colour[0].mention_count == 2
    assert stats["merged"] == 2 and stats["added"] == 3 and len(mems) == 3


def test_newer_statement_supersedes_older_and_history_is_kept(tmp_path, minilm):
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["I live in Paris.", "I work at Acme."], day=0)
    log_session(s, ["I moved to Berlin."], day=10)
    stats = sleep(s, minilm, now=T0 + 11 * DAY)
    assert stats["superseded"] == 1
    active = _active(s)
    assert active["user.home"].value == "Berlin" and active["user.employer"].value == "Acme"
    paris = [m for m in s.memories(active_only=False) if m.value == "Paris"][0]
    assert paris.superseded_by == active["user.home"].id  # kept, not deleted
    assert [h[2] for h in s.history(paris.id)] == ["add", "supersede"]
    # an older statement that is logged late becomes history at once; the newer fact stays current
    log_session(s, ["I live in Rome."], day=5)
    sleep(s, minilm, now=T0 + 12 * DAY)
    assert _active(s)["user.home"].value == "Berlin"
    rome = [m for m in s.memories(active_only=False) if m.value == "Rome"][0]
    assert rome.superseded_by == active["user.home"].id
    # and a genuinely newer one replaces Berlin
    log_session(s, ["I now live in Lisbon."], day=13)
    sleep(s, minilm, now=T0 + 14 * DAY)
    assert _active(s)["user.home"].value == "Lisbon"
    assert len([m for m in s.memories(active_only=False) if m.subject == "user.home"]) == 4


def test_importance_reflects_explicit_frequency_and_novelty(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["Remember that the spare key is under the blue flowerpot.",
                    "I spent the afternoon reading a novel about lighthouses."], day=0)
    for day in (1, 2, 3):
        log_session(s, ["My favourite tea is jasmine."], day=day)
    log_session(s, ["My favourite coffee is a flat white."], day=3)
    sleep(s, emb, now=T0 + 4 * DAY)
    by_text = {m.text: m for m in s.memories()}
    key = next(m for t, m in by_text.items() if "spare key" in t)
    novel = next(m for t, m in by_text.items() if "lighthouses" in t)
    tea = by_text["The user's favourite tea is jasmine."]
    coffee = by_text["The user's favourite coffee is a flat white."]
    assert key.explicit and key.importance > novel.importance
    assert tea.mention_count == 3 and tea.importance > coffee.importance  # frequency
    assert coffee.novelty < 0.9  # it resembles the tea memory that already existed
    assert novel.novelty > coffee.novelty


def test_forgetting_archives_old_unused_memories_never_deletes(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["I spent a rainy afternoon sorting my grandfather's stamp collection.",
                    "I bought a second hand trombone at the flea market.",
                    "Remember that my passport number ends in 4471."], day=0)
    sleep(s, emb, now=T0 + 1 * DAY)  # the memories become usable on day 1 ...
    log_session(s, ["I finally repaired the squeaky garden gate hinges."], day=200)
    sleep(s, emb, now=T0 + 201 * DAY)  # ... and nobody used them for 200 days
    active = [m.text for m in s.memories()]
    assert any("garden gate" in t for t in active)  # recent
    assert any("4471" in t for t in active)  # explicit memories are never forgotten
    archived = [m for m in s.memories(active_only=False) if m.archived]
    assert {("stamp" in m.text) or ("trombone" in m.text) for m in archived} == {True} and len(archived) == 2
    assert all(h[2] == "archive" for m in archived for h in s.history(m.id)[-1:])
    # use slows forgetting: a memory recalled often survives the same age
    s2 = Store(tmp_path / "m2.sqlite")
    log_session(s2, ["I spent a rainy afternoon sorting my grandfather's stamp collection.",
                     "I bought a second hand trombone at the flea market."], day=0)
    sleep(s2, emb, now=T0 + 1 * DAY)
    stamp = next(m for m in s2.memories() if "stamp" in m.text)
    for _ in range(12):
        s2.note_access([stamp.id], at=T0 + 2 * DAY)
    sleep(s2, emb, now=T0 + 201 * DAY)
    assert [m.text for m in s2.memories()] == [stamp.text]


def test_one_late_sleep_over_a_backlog_archives_nothing_it_just_found(tmp_path):
    """Decay counts from when a memory became usable: the first sleep, 200 days late, forgets nothing."""
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["I bought a second hand trombone at the flea market.", "I'm allergic to penicillin.",
                    "Please never use bullet points in your answers."], day=0)
    sleep(s, emb, now=T0 + 200 * DAY)
    assert len(s.memories()) == 3 and not [m for m in s.memories(active_only=False) if m.archived]
    # a year later with no use: the ordinary memory goes, the allergy and the instruction are protected
    sleep(s, emb, now=T0 + 600 * DAY)
    assert {m.memory_class for m in s.memories()} == {"identity", "instruction"}
    assert any("penicillin" in m.text for m in s.memories()) and any("bullet" in m.text for m in s.memories())


def _snapshot(store):
    rows = store.conn.execute(
        "SELECT id, text, kind, subject, value, round(importance, 6), round(novelty, 6), explicit, mention_count, "
        "access_count, created_at, updated_at, provenance, superseded_by, archived, round(strength, 6) FROM memories ORDER BY id"
    ).fetchall()
    hist = store.conn.execute("SELECT memory_id, action, detail, at FROM memory_history ORDER BY id").fetchall()
    inter = store.conn.execute("SELECT id, session_id, role, content, created_at, consolidated FROM interactions").fetchall()
    return rows, hist, inter


def test_sleep_is_idempotent(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["I live in Paris.", "My favourite colour is red.", "I restore vintage radios in my spare time."], day=0)
    log_session(s, ["I moved to Madrid.", "My favourite colour is red!"], day=3)
    sleep(s, emb, now=T0 + 4 * DAY)
    first = _snapshot(s)
    stats = sleep(s, emb, now=T0 + 4 * DAY)
    assert stats["interactions"] == 0 and stats["added"] == stats["merged"] == stats["archived"] == 0
    assert _snapshot(s) == first


class _StubLLM:
    can_extract = True

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def chat(self, messages, **kw):
        self.prompts.append(messages[-1]["content"])
        return self.reply


def test_llm_extraction_is_used_when_a_backend_is_configured(tmp_path):
    reply = ('Sure: [{"text": "The user is training for a marathon.", "kind": "fact", "subject": "user.training", '
             '"value": "marathon", "importance": 9}, {"text": "Keep answers short.", "kind": "lesson", "subject": null, '
             '"importance": 6}]')
    llm = _StubLLM(reply)
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["I'm training for the Oslo marathon, keep it short please."], day=0)
    stats = sleep(s, HashEmbedder(), backend=llm, now=T0 + DAY)
    assert stats["llm_batches"] == 1 and "marathon" in llm.prompts[0]
    mems = {m.text: m for m in s.memories()}
    assert mems["The user is training for a marathon."].llm_importance == pytest.approx(0.9)
    assert mems["The user is training for a marathon."].subject == "user.training"
    assert mems["Keep answers short."].kind == "lesson"
    # an unusable reply falls back to the rule-based extractor
    s2 = Store(tmp_path / "m2.sqlite")
    log_session(s2, ["My favourite colour is green."], day=0)
    stats = sleep(s2, HashEmbedder(), backend=_StubLLM("I cannot do that."), now=T0 + DAY)
    assert stats["rule_batches"] == 1 and [m.value for m in s2.memories()] == ["green"]
    assert parse_llm_items("[{\"text\": 3}]") == []
    # provenance and time order come from the message the LLM cites, whatever order it lists items in
    s3 = Store(tmp_path / "m3.sqlite")
    ids = log_session(s3, ["I live in Paris.", "Hello!", "Actually I moved to Rome."], day=0)
    llm = _StubLLM('[{"text": "The user lives in Rome.", "subject": "user.home", "value": "Rome", "source": 2}, '
                   '{"text": "The user lives in Paris.", "subject": "user.home", "value": "Paris", "source": "[0]"}]')
    sleep(s3, HashEmbedder(), backend=llm, now=T0 + DAY)
    assert "[0] user: I live in Paris." in llm.prompts[0] and "[2] user: Actually I moved to Rome." in llm.prompts[0]
    (home,) = s3.memories()
    assert home.value == "Rome" and home.provenance == [ids[2]]
    (paris,) = [m for m in s3.memories(active_only=False) if m.value == "Paris"]
    assert paris.provenance == [ids[0]] and paris.superseded_by == home.id


def _cli(db, *extra, env=None):
    cmd = [sys.executable, "-m", "memlm.apps.ltml", "sleep", "--db", str(db), "--embedder", "hash", "--batch-size", "3",
           "--json", *extra]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return cmd, full_env


def test_kill_during_sleep_loses_nothing_and_rerun_equals_uninterrupted(tmp_path):
    db = tmp_path / "crash.sqlite"
    s = Store(db)
    for day in range(12):
        log_session(s, [f"My favourite number is {day}.", f"I visited museum number {day} with my aunt Clara today.",
                        "Hello!", "I live in Paris." if day < 6 else "I live in Rome."], day=day)
    n_inter = len(s.interactions())
    s.close()
    ref = tmp_path / "ref.sqlite"
    shutil.copy(db, ref)
    now = str(T0 + 20 * DAY)

    cmd, env = _cli(db, "--now", now, env={PAUSE_ENV: "0.4"})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = Store(db)
    deadline = time.time() + 60
    while time.time() < deadline:
        pending = len(watcher.pending_interactions())
        if 0 < pending <= n_inter - 9:  # at least three batches committed, more to go
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    pending = len(watcher.pending_interactions())
    assert 0 < pending < n_inter, "the kill did not land in the middle of the pass"
    assert watcher.conn.execute("SELECT COUNT(*) FROM sleep_runs WHERE finished_at IS NULL").fetchone()[0] == 1
    assert len(watcher.interactions()) == n_inter  # the raw log is intact
    watcher.close()

    # rerun (with a different --now: the interrupted run's recorded clock is used)
    cmd, env = _cli(db, "--now", str(T0 + 999 * DAY))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["resumed"] and stats["now"] == float(now)
    cmd, env = _cli(ref, "--now", now)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    with Store(db) as a, Store(ref) as b:
        snap_a, snap_b = _snapshot(a), _snapshot(b)
        assert snap_a[0] == snap_b[0]  # memories identical
        assert snap_a[2] == snap_b[2]  # every interaction kept and consolidated
        assert [h[:2] for h in snap_a[1]] == [h[:2] for h in snap_b[1]]
        assert a.stats()["pending_interactions"] == 0
        assert [m.value for m in a.memories() if m.subject == "user.home"] == ["Rome"]


def test_two_concurrent_sleepers_do_not_double_count(tmp_path):
    import threading

    db = tmp_path / "two.sqlite"
    s = Store(db)
    for day in range(6):
        log_session(s, ["My favourite tea is jasmine.", f"I repaired bicycle number {day} in my garage today."], day=day)
    s.close()
    stores = [Store(db), Store(db)]
    threads = [threading.Thread(target=sleep, args=(st, HashEmbedder()), kwargs={"now": T0 + 7 * DAY,
               "config": SleepConfig(batch_size=2)}) for st in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with Store(db) as s:
        tea = [m for m in s.memories() if m.subject == "user.favorite_tea"]
        assert len(tea) == 1 and tea[0].mention_count == 6 and len(tea[0].provenance) == 6
        assert s.stats()["pending_interactions"] == 0
    for st in stores:
        st.close()

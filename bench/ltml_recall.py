"""LTML memory recall across many sessions: does the right *current* fact reach the prompt?

A synthetic user talks to an assistant over >= 20 sessions spread over two months. The
user states ~18 personal facts (home, employer, pet, sister, favourite things, ...), some
more than once and in different wordings; about a third of them are **updated** in a later
session (moved city, new job, new favourite colour); every session also has distractor
chatter (greetings, questions, jokes, small talk, and the assistant's replies). After the
last session, one question per fact is asked ("Where do I live?").

Methods, each run on the same generated log, interleaved per user:

- ``ltml``      : sleep (consolidation) then wake: top memories by relevance + importance +
                  recency, within the token budget (MiniLM embeddings);
- ``ltml-hash`` : the same with the lexical hash embedder (no neural model);
- ``raw-rag``   : no sleep: top-5 raw user messages by MiniLM cosine (a plain RAG log).

Figures: recall@5 of the current value, stale rate (questions whose injected block
contains a superseded value of the asked fact), injected tokens per turn (word-based
estimate, memlm's ``estimate_tokens``), storage before/after sleep (raw log bytes vs
active memory bytes, rows), sleep time, and wake latency.

    python bench/ltml_recall.py [--quick] [--users N] [--sessions N] [--budget TOKENS]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402

DAY = 86400.0
T0 = 1_750_000_000.0

# subject -> (question, first-statement templates, update templates, value pool)
FACTS = {
    "home": ("Where do I live?", ["I live in {v}.", "I live in {v} these days.", "By the way, I live in {v}."],
             ["I moved to {v}.", "Guess what, I now live in {v}!", "Quick update: I moved to {v} last month."],
             ["Oslo", "Lisbon", "Kyoto", "Denver", "Tallinn", "Porto", "Quito", "Hobart", "Gdansk", "Nairobi"]),
    "employer": ("Which company do I work for?", ["I work at {v}.", "I work for {v}."],
                 ["I now work at {v}.", "Quick update: I now work for {v}."],
                 ["Initech", "Globex", "Umbrella Labs", "Hooli", "Vandelay Industries", "Stark Freight", "Wonka Foods"]),
    "color": ("What is my favourite colour?", ["My favourite colour is {v}.", "my favorite color is {v}!"],
              ["My favourite colour is {v} now.", "Actually, my favourite colour is {v} these days."],
              ["teal", "crimson", "mustard", "lavender", "olive", "indigo", "coral"]),
    "food": ("What is my favourite food?", ["My favourite food is {v}.", "My favorite food is {v}."],
             ["My favourite food is {v} now."], ["ramen", "paella", "pierogi", "falafel", "lasagne", "bibimbap"]),
    "dog": ("What is my dog called?", ["I have a dog named {v}.", "I have a dog called {v}."], [],
            ["Biscuit", "Pepper", "Rufus", "Waffles", "Nala", "Comet"]),
    "sister": ("What is my sister's name?", ["My sister's name is {v}.", "My sister is called {v}."], [],
               ["Ingrid", "Priya", "Mireille", "Yuki", "Beatriz", "Astrid"]),
    "car": ("What car do I drive?", ["My car is a {v}.", "My car is an old {v}."], ["My new car is a {v}."],
            ["Volvo 240", "Fiat Panda", "Subaru Outback", "Mazda Miata", "Skoda Octavia"]),
    "hobby": ("What is my hobby?", ["My hobby is {v}.", "My main hobby is {v}."], ["My hobby is {v} now."],
              ["bouldering", "birdwatching", "pottery", "kayaking", "chess", "origami"]),
    "book": ("What is my favourite book?", ["My favourite book is {v}.", "My favorite book is {v}."], [],
             ["Dune", "Middlemarch", "Solaris", "Beloved", "Kindred", "Pachinko"]),
    "age": ("How old am I?", ["I am {v} years old.", "I'm {v} years old."], [], ["29", "34", "41", "47", "52"]),
    "team": ("Which football team do I support?", ["My favourite football team is {v}."],
             ["My favourite football team is {v} now."], ["Celtic", "Ajax", "Benfica", "Napoli", "Boca Juniors"]),
    "partner": ("What is my partner's name?", ["My partner's name is {v}.", "My partner is called {v}."], [],
                ["Tomasz", "Amara", "Lucien", "Keiko", "Rafael"]),
    "drink": ("What do I like to drink?", ["My favourite drink is {v}.", "My favorite drink is {v}."],
              ["My favourite drink is {v} now."], ["kombucha", "oolong tea", "espresso", "lemonade", "cider"]),
    "language": ("What is my native language?", ["My native language is {v}."], [],
                 ["Finnish", "Tagalog", "Catalan", "Hungarian", "Swahili"]),
    "phone": ("What phone do I have?", ["My phone is a {v}."], ["My new phone is a {v}."],
              ["Pixel 8", "Fairphone 5", "iPhone 13", "Nokia 3310"]),
    "cat": ("What is my cat's name?", ["I have a cat named {v}.", "I have a cat called {v}."], [],
            ["Miso", "Tofu", "Ziggy", "Marmalade", "Pixel"]),
    "birthday": ("When is my birthday?", ["My birthday is in {v}.", "My birthday is in {v}, just so you know."], [],
                 ["March", "July", "November", "February", "October"]),
    "instrument": ("Which instrument do I play?", ["My instrument is the {v}.", "My main instrument is the {v}."], [],
                   ["cello", "bassoon", "ukulele", "harp", "trombone"]),
}

# a second question per fact that shares few words with the statement
PARAPHRASE = {
    "home": "Which city am I based in?", "employer": "Who is my employer?", "color": "Which colour do I like best?",
    "food": "What dish do I love most?", "dog": "What's the name of my puppy?", "sister": "Who is my sibling?",
    "car": "What vehicle do I own?", "hobby": "What do I do in my free time?", "book": "Which novel do I love?",
    "age": "What is my age?", "team": "Which club do I cheer for?", "partner": "Who am I in a relationship with?",
    "drink": "What's my preferred beverage?", "language": "Which language did I grow up speaking?",
    "phone": "Which smartphone do I use?", "cat": "What did I name my kitten?", "birthday": "In which month was I born?",
    "instrument": "What instrument can I play?",
}

CHATTER_USER = [
    "Hi!", "Hello again.", "Can you tell me a joke?", "What's the capital of Australia?", "Thanks, that helps.",
    "Could you summarise the French revolution in two lines?", "How do I boil an egg?", "lol", "Good morning!",
    "I had a long day at work today.", "The weather has been awful this week.", "What time zone is Tokyo in?",
    "I watched a documentary about volcanoes yesterday.", "Can you recommend a podcast?", "ok cool", "Bye for now.",
    "How many legs does a spider have?", "I'm a bit tired today.", "Write me a haiku about rain.",
    "What does 'ubiquitous' mean?", "My friend told me a funny story about her neighbour's goat.",
]
CHATTER_ASSISTANT = [
    "Sure! Here is one: why did the scarecrow win an award? Because he was outstanding in his field.",
    "Canberra is the capital of Australia.", "You're welcome!", "Happy to help with that.",
    "Boil it for about nine minutes for a firm yolk.", "Spiders have eight legs.", "Good morning! How can I help?",
    "Rain taps the window / the kettle hums in reply / grey afternoon tea.", "It means found everywhere.",
]


def make_user(seed: int, n_sessions: int) -> tuple[list[list[tuple[str, str]]], dict, dict]:
    """Sessions of (role, text); the current value and the superseded values per subject."""
    rng = random.Random(seed)
    sessions: list[list[tuple[str, str]]] = [[] for _ in range(n_sessions)]
    current, stale = {}, {}
    first_window = max(1, int(n_sessions * 0.6))
    for subj, (_q, first, updates, pool) in FACTS.items():
        values = rng.sample(pool, k=min(len(pool), 3))
        s0 = rng.randrange(first_window)
        sessions[s0].append(("user", rng.choice(first).format(v=values[0])))
        value, old = values[0], []
        s1 = None
        if updates and rng.random() < 0.5 and s0 + 2 < n_sessions:  # updated later
            s1 = rng.randrange(s0 + 2, n_sessions)
            old.append(value)
            sessions[s1].append(("user", rng.choice(updates).format(v=values[1])))
        if rng.random() < 0.35 and s0 + 1 < (s1 or n_sessions):  # restated (before any update) in other words
            s = rng.randrange(s0 + 1, s1 or n_sessions)
            sessions[s].append(("user", rng.choice(first).format(v=value)))
        if s1 is not None:
            value = values[1]
        current[subj], stale[subj] = value, old
    for sess in sessions:
        facts = list(sess)
        sess.clear()
        chatter = [("user", rng.choice(CHATTER_USER)) for _ in range(rng.randint(3, 6))]
        turns = facts + chatter
        rng.shuffle(turns)
        for role_text in turns:
            sess.append(role_text)
            sess.append(("assistant", rng.choice(CHATTER_ASSISTANT)))
    return sessions, current, stale


def log_user(store, sessions) -> float:
    for i, sess in enumerate(sessions):
        at = T0 + i * (60 * DAY / len(sessions))
        sid = store.start_session("bench", at=at)
        for j, (role, text) in enumerate(sess):
            store.log(sid, role, text, at=at + 30 * j)
        store.end_session(sid, at=at + 30 * len(sess))
    return T0 + 61 * DAY


def score(texts: list[str], current: str, stale: list[str]) -> tuple[bool, bool]:
    blob = " ".join(texts).lower()
    return current.lower() in blob, any(s.lower() in blob for s in stale)


def run_ltml(db: Path, sessions, current, stale, embedder, budget: int, k: int) -> dict:
    from memlm.memory.ltml.sleep import sleep
    from memlm.memory.ltml.store import Store
    from memlm.memory.ltml.wake import WakeConfig, wake

    store = Store(db)
    now = log_user(store, sessions)
    before = store.stats()
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size_before = db.stat().st_size + (Path(str(db) + "-wal").stat().st_size if Path(str(db) + "-wal").exists() else 0)
    t = time.perf_counter()
    stats = sleep(store, embedder, now=now)
    sleep_s = time.perf_counter() - t
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    after = store.stats()
    hits, stales, para_hits = 0, 0, 0
    tokens, lat, tokens_deployed = [], [], []
    cfg = WakeConfig(budget_tokens=budget, top_k=k, core_k=0)  # recall@k: exactly the k query-ranked memories
    deployed = WakeConfig(budget_tokens=budget)  # what chat.py injects (top 8 + 2 core memories)
    for subj, (question, *_rest) in FACTS.items():
        t = time.perf_counter()
        inj = wake(store, embedder, question, cfg, now=now, touch=False)
        lat.append(time.perf_counter() - t)
        tokens_deployed.append(wake(store, embedder, question, deployed, now=now, touch=False).tokens)
        hit, st = score([it.memory.text for it in inj.items], current[subj], stale[subj])
        hits += hit
        stales += st
        tokens.append(inj.tokens)
        para = wake(store, embedder, PARAPHRASE[subj], cfg, now=now, touch=False)
        para_hits += score([it.memory.text for it in para.items], current[subj], stale[subj])[0]
    store.close()
    n = len(FACTS)
    return {"recall@5": hits / n, "recall@5_para": para_hits / n, "stale_rate": stales / n,
            "tokens_per_turn": float(np.mean(tokens)), "tokens_per_turn_deployed": float(np.mean(tokens_deployed)),
            "raw_rows": before["interactions"], "raw_bytes": before["interaction_bytes"],
            "memory_rows": after["active_memories"], "memory_bytes": after["active_memory_bytes"],
            "superseded": after["superseded_memories"], "archived": after["archived_memories"],
            "db_bytes_before": size_before, "db_bytes_after": db.stat().st_size, "sleep_s": sleep_s,
            "wake_ms": 1000 * float(np.mean(lat)), "merged": stats["merged"],
            "vector_bytes": after["active_memories"] * embedder.dim * 4}


def run_raw_rag(sessions, current, stale, embedder, k: int) -> dict:
    from memlm.memory.ltml.wake import HEADER, estimate_tokens

    msgs = [text for sess in sessions for role, text in sess if role == "user"]
    mat = embedder.encode(msgs)
    hits, stales, para_hits = 0, 0, 0
    tokens, lat = [], []
    for subj, (question, *_rest) in FACTS.items():
        t = time.perf_counter()
        sims = mat @ embedder.encode([question])[0]
        top = [msgs[i] for i in np.argsort(-sims)[:k]]
        lat.append(time.perf_counter() - t)
        hit, st = score(top, current[subj], stale[subj])
        hits += hit
        stales += st
        tokens.append(estimate_tokens("\n".join([HEADER] + [f"- {m}" for m in top])))
        psims = mat @ embedder.encode([PARAPHRASE[subj]])[0]
        para_hits += score([msgs[i] for i in np.argsort(-psims)[:k]], current[subj], stale[subj])[0]
    n = len(FACTS)
    raw_bytes = sum(len(t.encode()) for sess in sessions for _r, t in sess)
    return {"recall@5": hits / n, "recall@5_para": para_hits / n, "stale_rate": stales / n,
            "tokens_per_turn": float(np.mean(tokens)), "raw_rows": sum(len(s) for s in sessions), "raw_bytes": raw_bytes, "memory_rows": len(msgs),
            "memory_bytes": sum(len(m.encode()) for m in msgs), "wake_ms": 1000 * float(np.mean(lat)),
            "vector_bytes": len(msgs) * embedder.dim * 4}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 users (< 2 minutes)")
    p.add_argument("--users", type=int, default=None, help="synthetic users (default 8; 2 with --quick)")
    p.add_argument("--sessions", type=int, default=24, help="sessions per user (>= 20)")
    p.add_argument("--budget", type=int, default=200, help="token budget of the injected block")
    p.add_argument("--k", type=int, default=5, help="memories injected per turn (recall@k)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    users = args.users or (2 if args.quick else 8)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from memlm.memory.ltml.embeddings import HashEmbedder, MiniLMEmbedder

    t = time.perf_counter()
    minilm = MiniLMEmbedder()
    load_s = time.perf_counter() - t
    hashed = HashEmbedder()
    per_method: dict[str, list[dict]] = {"ltml": [], "ltml-hash": [], "raw-rag": []}
    n_updates = 0
    with tempfile.TemporaryDirectory() as tmp:
        for u in range(users):
            sessions, current, stale = make_user(args.seed + u, args.sessions)
            n_updates += sum(1 for v in stale.values() if v)
            per_method["ltml"].append(run_ltml(Path(tmp) / f"u{u}.sqlite", sessions, current, stale, minilm, args.budget, args.k))
            per_method["ltml-hash"].append(run_ltml(Path(tmp) / f"u{u}h.sqlite", sessions, current, stale, hashed,
                                                    args.budget, args.k))
            per_method["raw-rag"].append(run_raw_rag(sessions, current, stale, minilm, args.k))
    rows = []
    for name, results in per_method.items():
        mean = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
        rows.append({"method": name, **{k: mean.get(k, float("nan")) for k in
                     ("recall@5", "recall@5_para", "stale_rate", "tokens_per_turn", "memory_rows", "memory_bytes", "vector_bytes",
                      "wake_ms",
                      "sleep_s")}})
    print(f"{users} users x {args.sessions} sessions, {len(FACTS)} facts each, {n_updates} updated facts in total; "
          f"MiniLM load {load_s:.1f}s")
    print_table(rows)
    base, lt, lh = (next(r for r in rows if r["method"] == m) for m in ("raw-rag", "ltml", "ltml-hash"))
    ltml_all = per_method["ltml"]
    figures = {
        "ltml_recall_at_5": lt["recall@5"], "ltml_recall_at_5_paraphrased": lt["recall@5_para"],
        "ltml_stale_rate": lt["stale_rate"],
        "ltml_tokens_per_turn": lt["tokens_per_turn"],
        "ltml_tokens_per_turn_deployed": float(np.mean([r["tokens_per_turn_deployed"] for r in ltml_all])),
        "ltml_hash_recall_at_5": lh["recall@5"], "ltml_hash_recall_at_5_paraphrased": lh["recall@5_para"], "ltml_hash_stale_rate": lh["stale_rate"],
        "raw_rag_recall_at_5": base["recall@5"], "raw_rag_recall_at_5_paraphrased": base["recall@5_para"], "raw_rag_stale_rate": base["stale_rate"],
        "raw_rag_tokens_per_turn": base["tokens_per_turn"],
        "recall_ratio_ltml_vs_raw": lt["recall@5"] / max(base["recall@5"], 1e-9),
        "storage_raw_bytes": float(np.mean([r["raw_bytes"] for r in ltml_all])),
        "storage_memory_bytes": float(np.mean([r["memory_bytes"] for r in ltml_all])),
        "storage_ratio_memory_vs_raw": float(np.mean([r["memory_bytes"] / r["raw_bytes"] for r in ltml_all])),
        "raw_rows": float(np.mean([r["raw_rows"] for r in ltml_all])),
        "memory_rows": float(np.mean([r["memory_rows"] for r in ltml_all])),
        "db_bytes_before_sleep": float(np.mean([r["db_bytes_before"] for r in ltml_all])),
        "db_bytes_after_sleep": float(np.mean([r["db_bytes_after"] for r in ltml_all])),
        "sleep_seconds": lt["sleep_s"], "wake_ms": lt["wake_ms"], "raw_rag_wake_ms": base["wake_ms"],
        "ltml_vector_bytes": lt["vector_bytes"], "raw_rag_vector_bytes": base["vector_bytes"],
    }
    print(f"storage: raw log {figures['storage_raw_bytes']:.0f} B in {figures['raw_rows']:.0f} rows -> "
          f"{figures['storage_memory_bytes']:.0f} B in {figures['memory_rows']:.0f} active memories "
          f"(x{figures['storage_ratio_memory_vs_raw']:.3f}); the raw log is kept (source of truth): "
          f"database {figures['db_bytes_before_sleep']:.0f} B -> {figures['db_bytes_after_sleep']:.0f} B")
    print_result(figures, {"users": users, "sessions": args.sessions, "facts": len(FACTS), "budget": args.budget,
                           "k": args.k, "seed": args.seed, "quick": args.quick})
    return 0


if __name__ == "__main__":
    run_main(main)

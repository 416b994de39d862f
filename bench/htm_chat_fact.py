"""How often HTM chat learning completes a fact taught in turn 1 at turn 5, over fixture seeds.

    python bench/htm_chat_fact.py [--seeds 6] [--passes 10] [--bag]

It replays the session of tests/lightning_modules/test_htm_chat.py (the same dialogue
fixture, chat.py --learn --template none, a fact, three other turns of which the last
re-teaches "is t", then the fact's prefix) once per seed of the fixture model and per fact,
and counts the sessions whose reply starts with the fact's answer. The test's fact is the
first; the others share words or the "is " context with the fixture in other ways.
``--bag`` turns the positional word context off (a bag of words), ``--passes`` sets the
rehearsals per turn.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "lightning_modules"))  # the test's fixture and session, not a copy

from memlm.apps.chat_backends import LocalBackend  # noqa: E402
from memlm.core.bench import print_result, print_table  # noqa: E402
from memlm.core.errors import run_main  # noqa: E402
import test_htm_chat  # noqa: E402
from test_htm_chat import chat_session, dialogue_model, five_turns  # noqa: E402

FACTS = [  # (taught in turn 1, asked in turn 5, the answer that must start the reply)
    ("the secret word is banana", "the secret word is", "banana"),
    ("the door code is four two", "the door code is", "four"),
    ("bob lives in a red house", "bob lives in a", "red"),
    ("my dog is called rex", "my dog is called", "rex"),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--passes", type=int, default=10, help="rehearsals of each learned turn (chat.py --learn-passes)")
    p.add_argument("--bag", action="store_true", help="word context as a bag of words (context_positional: false)")
    args = p.parse_args()
    rows, t0 = [], time.perf_counter()
    for fact, prefix, answer in FACTS:
        test_htm_chat.FACT, test_htm_chat.PREFIX = fact, prefix  # five_turns reads them
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                model = dialogue_model(seed=seed, context_positional=not args.bag)
                chat = chat_session(LocalBackend(model, name="htm", template="none"), Path(tmp), "--learn",
                                    "--learn-state", str(Path(tmp) / "s.pt"), "--learn-passes", str(args.passes))
                reply = five_turns(chat).strip()
            rows.append({"fact": fact, "seed": seed, "turn_5_reply": repr(reply), "completed": reply.startswith(answer)})
    print_table(rows)
    done = sum(r["completed"] for r in rows)
    per_fact = {f: sum(r["completed"] for r in rows if r["fact"] == f) for f, _, _ in FACTS}
    print_result({"completed": done, "sessions": len(rows), "rate": done / len(rows),
                  "test_fact_completed": per_fact[FACTS[0][0]], "per_fact": per_fact,
                  "seconds": round(time.perf_counter() - t0, 1)}, vars(args))
    return 0


if __name__ == "__main__":
    run_main(main)

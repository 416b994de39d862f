"""``python -m memlm.apps.ltml {sleep,wake,reflect,log,stats,list,history,forget,restore,reindex} --db PATH``."""
from __future__ import annotations

import argparse
import json
import sys
import time

from memlm.core.errors import MemLMError, run_main


def _embedder(args):
    from memlm.checkpoint import load_module
    from memlm.memory.ltml.embeddings import get_embedder

    emb = get_embedder(args.embedder, base_url=args.base_url, api_key=args.api_key, load_checkpoint=load_module)
    print(f"ltml: embedder {emb.name}", file=sys.stderr)
    return emb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memlm.apps.ltml", description="LTML long-term memory tools")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, needs_embedder=False):
        sp.add_argument("--db", required=True, help="LTML SQLite database")
        if needs_embedder:
            sp.add_argument("--embedder", default="auto", help="auto | minilm | hash | openai[:MODEL] | ckpt:PATH")
            sp.add_argument("--base-url", default=None, help="OpenAI-compatible backend (LLM extraction, embeddings)")
            sp.add_argument("--model", default=None)
            sp.add_argument("--api-key", default=None)

    sp = sub.add_parser("sleep", help="consolidate the log into memories (resumes an interrupted pass)")
    common(sp, True)
    sp.add_argument("--now", type=float, default=None, help="reference unix time (default: now)")
    sp.add_argument("--no-llm", action="store_true", help="rule-based extraction even with --base-url")
    sp.add_argument("--forget-threshold", type=float, default=None)
    sp.add_argument("--batch-size", type=int, default=None)
    sp.add_argument("--json", action="store_true", help="print the stats as JSON")

    sp = sub.add_parser("wake", help="show what would be injected for a query")
    common(sp, True)
    sp.add_argument("--query", default=None)
    sp.add_argument("--budget", type=int, default=200)
    sp.add_argument("--top-k", type=int, default=0, help="at most this many items (0: the budget decides)")

    sp = sub.add_parser("reflect", help="what did the user correct? one lesson per corrected assistant answer "
                                        "(read-only; sleep stores them)")
    sp.add_argument("--db", required=True, help="LTML SQLite database")
    sp.add_argument("--base-url", default=None, help="OpenAI-compatible backend (JSON schema; rules on failure)")
    sp.add_argument("--model", default=None)
    sp.add_argument("--api-key", default=None)
    sp.add_argument("--json", action="store_true", help="print the lessons as JSON lines")

    sp = sub.add_parser("log", help="append one interaction to the log")
    common(sp)
    sp.add_argument("--role", default="user", choices=["user", "assistant", "system"])
    sp.add_argument("--text", required=True)
    sp.add_argument("--session", type=int, default=None)
    sp.add_argument("--at", type=float, default=None)

    for name, helptext in [("stats", "counts and sizes"), ("list", "list memories"), ("reindex", "rebuild the FAISS index")]:
        sp = sub.add_parser(name, help=helptext)
        common(sp, name == "reindex")
        if name == "list":
            sp.add_argument("--all", action="store_true", help="include superseded and archived memories")
    sp = sub.add_parser("history", help="change history of one memory")
    common(sp)
    sp.add_argument("id", type=int)
    sp = sub.add_parser("forget", help="archive a memory now, with history (undo with restore)")
    common(sp)
    sp.add_argument("id", type=int)
    sp = sub.add_parser("restore", help="bring back an archived memory")
    common(sp)
    sp.add_argument("id", type=int)

    args = p.parse_args(argv)
    from memlm.memory.ltml.store import Store

    readonly = args.cmd != "log"  # only 'log' may create a new database
    store = Store(args.db, readonly=readonly)
    try:
        if args.cmd == "sleep":
            from memlm.memory.ltml.sleep import SleepConfig, sleep

            emb = _embedder(args)
            backend = None
            if args.base_url and not args.no_llm:
                from memlm.apps.chat_backends import OpenAIBackend

                backend = OpenAIBackend(args.base_url, model=args.model, api_key=args.api_key)
            cfg = SleepConfig(use_llm=not args.no_llm)
            if args.forget_threshold is not None:
                cfg.forget_threshold = args.forget_threshold
            if args.batch_size:
                cfg.batch_size = args.batch_size
            stats = sleep(store, emb, backend=backend, now=args.now, config=cfg, log=lambda m: print(m, file=sys.stderr))
            print(json.dumps(stats, sort_keys=True) if args.json else
                  f"slept: {stats['interactions']} interactions, {stats['added']} added, {stats['merged']} merged, "
                  f"{stats['superseded']} superseded, {stats['archived']} archived")
        elif args.cmd == "wake":
            from memlm.memory.ltml.wake import WakeConfig, wake

            inj = wake(store, _embedder(args), args.query, WakeConfig(budget_tokens=args.budget, top_k=args.top_k), touch=False)
            print(inj.explain())
            if inj.text:
                print(inj.text)
        elif args.cmd == "reflect":
            from memlm.memory.ltml.reflect import reflect

            backend = None
            if args.base_url:
                from memlm.apps.chat_backends import OpenAIBackend

                backend = OpenAIBackend(args.base_url, model=args.model, api_key=args.api_key)
            found = reflect(store, backend, log=lambda m: print(m, file=sys.stderr))
            for c in found:
                print(json.dumps({"reply": c.reply_id, "kind": c.kind, "source": c.source, "lesson": c.lesson,
                                  "feedback": c.feedback}, ensure_ascii=False) if args.json else
                      f"#{c.reply_id} [{c.kind}, {c.source}] {c.lesson}")
            if not found:
                print("no corrections found")
        elif args.cmd == "log":
            sid = args.session if args.session is not None else store.start_session("cli", at=args.at)
            print(store.log(sid, args.role, args.text, at=args.at))
        elif args.cmd == "stats":
            print(json.dumps(store.stats(), indent=1, sort_keys=True))
        elif args.cmd == "list":
            for m in store.memories(active_only=not args.all, with_embeddings=False):
                state = "active" if m.active else ("superseded" if m.superseded_by else "archived")
                print(f"#{m.id} [{m.kind}, {state}, importance {m.importance:.2f}, x{m.mention_count}] {m.text}")
        elif args.cmd == "history":
            for hid, mid, action, detail, at in store.history(args.id):
                print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(at))} {action} {json.dumps(detail)}")
        elif args.cmd == "forget":
            m = store.get(args.id)
            if not m.active:
                raise MemLMError(f"memory #{args.id} is not active; see `list --all` for its state")
            store.forget(args.id, reason={"by": "cli"})
            print(f"forgot #{args.id}: {m.text}")
        elif args.cmd == "restore":
            m = store.get(args.id)
            if not m.archived:
                raise MemLMError(f"memory #{args.id} is not archived; nothing to restore")
            store.restore(args.id)
            print(f"restored #{args.id}: {m.text}")
        elif args.cmd == "reindex":
            from memlm.memory.ltml.index import MemoryIndex
            from memlm.memory.ltml.sleep import ensure_embedder

            emb = _embedder(args)
            ensure_embedder(store, emb)
            idx = MemoryIndex(store, emb.name).rebuild()
            print(f"indexed {idx.index.ntotal} memories -> {idx.path}")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    run_main(main)

"""LTML SQLite store: schema, WAL, migrations, transactions, and the derived FAISS index."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from memlm.core.errors import MemLMError
from memlm.memory.ltml.index import MemoryIndex
from memlm.memory.ltml.store import MIGRATIONS, SCHEMA_VERSION, Store


def test_new_database_is_wal_and_at_the_current_schema(tmp_path):
    with Store(tmp_path / "m.sqlite") as s:
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.schema_version() == SCHEMA_VERSION
        tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"sessions", "interactions", "memories", "memory_history", "sleep_runs", "meta"} <= tables
        sid = s.start_session("x", at=1.0)
        iid = s.log(sid, "user", "hello", at=2.0)
        assert s.pending_interactions() == [(iid, sid, "user", "hello", 2.0)]


def test_migration_upgrades_a_v1_file_and_keeps_its_data(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[1])
    conn.execute("INSERT INTO meta VALUES('schema_version', '1')")
    conn.execute("INSERT INTO memories(text, kind, created_at, updated_at) VALUES('The user likes tea.', 'preference', 1, 1)")
    conn.commit()
    conn.close()
    with Store(path) as s:
        assert s.schema_version() == SCHEMA_VERSION
        (m,) = s.memories()
        assert m.text == "The user likes tea." and m.strength == 1.0 and m.embed_text is None and m.llm_importance is None
        cols = {r[1] for r in s.conn.execute("PRAGMA table_info(memories)")}
        assert {"strength", "llm_importance", "embed_text"} <= cols


def test_newer_schema_and_non_database_files_are_clear_errors(tmp_path):
    path = tmp_path / "future.sqlite"
    with Store(path) as s:
        s.set_meta("schema_version", str(SCHEMA_VERSION + 5))
    with pytest.raises(MemLMError, match="newer than this code"):
        Store(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MemLMError, match="not an LTML database|cannot open"):
        Store(junk)
    with pytest.raises(MemLMError, match="not found"):
        Store(tmp_path / "missing.sqlite", readonly=True)


def test_transaction_rolls_back_everything_on_error(tmp_path):
    with Store(tmp_path / "m.sqlite") as s:
        with pytest.raises(RuntimeError):
            with s.transaction():
                s.add_memory("a", "fact", np.ones(4, np.float32), at=1.0)
                s.add_memory("b", "fact", np.ones(4, np.float32), at=1.0)
                raise RuntimeError("boom")
        assert s.memories(active_only=False) == [] and s.history() == [] and s.generation() == 0


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_faiss_index_tracks_sqlite_and_rebuilds_when_stale_missing_or_corrupt(tmp_path):
    s = Store(tmp_path / "m.sqlite")
    a = s.add_memory("a", "fact", _unit([1, 0, 0, 0]), at=1.0)
    b = s.add_memory("b", "fact", _unit([0, 1, 0, 0]), at=1.0)
    idx = MemoryIndex(s, "test-emb").ensure()
    assert idx.rebuilt and idx.path.is_file()
    ids, sims = idx.search(_unit([0.9, 0.1, 0, 0]), 2)
    assert list(ids) == [a, b] and sims[0] > sims[1]
    # a fresh process-like reader loads the file instead of rebuilding
    again = MemoryIndex(s, "test-emb").ensure()
    assert not again.rebuilt and again.index.ntotal == 2
    # a change in SQLite makes the file stale
    c = s.add_memory("c", "fact", _unit([0, 0, 1, 0]), at=2.0)
    stale = MemoryIndex(s, "test-emb").ensure()
    assert stale.rebuilt and stale.index.ntotal == 3
    assert list(stale.search(_unit([0, 0, 1, 0]), 1)[0]) == [c]
    # superseded memories leave the index
    s.update_memory(a, superseded_by=c)
    s.bump_generation()
    assert a not in set(MemoryIndex(s, "test-emb").ensure().search(_unit([1, 0, 0, 0]), 3)[0].tolist())
    # another embedder, a missing file or a corrupt file: rebuilt from SQLite
    assert MemoryIndex(s, "other-emb").ensure().rebuilt
    idx.path.unlink()
    assert MemoryIndex(s, "test-emb").ensure().rebuilt
    idx.path.write_bytes(b"garbage")
    MemoryIndex(s, "test-emb").meta_path.write_text('{"generation": %d, "embedder": "test-emb"}' % s.generation())
    fixed = MemoryIndex(s, "test-emb").ensure()
    assert fixed.rebuilt and fixed.index.ntotal == 2
    s.close()


def test_restore_brings_back_an_archived_memory_with_history(tmp_path):
    with Store(tmp_path / "m.sqlite") as s:
        mid = s.add_memory("x", "fact", _unit([1, 1]), at=1.0)
        s.update_memory(mid, archived=1)
        assert s.memories() == []
        s.restore(mid, at=5.0)
        assert [m.id for m in s.memories()] == [mid]
        assert [h[2] for h in s.history(mid)] == ["add", "restore"]


def test_command_line_tools(tmp_path, capsys):
    from memlm.apps.ltml import main

    db = str(tmp_path / "cli.sqlite")
    with pytest.raises(MemLMError, match="not found"):
        main(["sleep", "--db", db, "--embedder", "hash"])
    assert main(["log", "--db", db, "--text", "I live in Oslo.", "--at", "1700000000"]) == 0
    assert main(["log", "--db", db, "--text", "I moved to Bergen.", "--at", "1700100000"]) == 0
    capsys.readouterr()
    assert main(["sleep", "--db", db, "--embedder", "hash", "--now", "1700200000"]) == 0
    assert "2 interactions, 2 added, 0 merged, 1 superseded" in capsys.readouterr().out
    main(["list", "--db", db, "--all"])
    out = capsys.readouterr().out
    assert "superseded" in out and "active" in out and "Bergen" in out
    main(["history", "--db", db, "1"])
    assert "supersede" in capsys.readouterr().out
    main(["wake", "--db", db, "--embedder", "hash", "--query", "where do I live?"])
    out = capsys.readouterr().out
    assert "- (2023-11-16) The user lives in Bergen." in out and "Oslo" not in out  # dated; the stale episode hidden
    main(["stats", "--db", db])
    assert '"superseded_memories": 1' in capsys.readouterr().out
    with pytest.raises(MemLMError, match="not archived"):
        main(["restore", "--db", db, "2"])
    main(["reindex", "--db", db, "--embedder", "hash"])
    assert "indexed 1 memories" in capsys.readouterr().out

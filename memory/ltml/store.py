"""LTML store: SQLite is the source of truth, FAISS is a derived index over it.

Tables (schema versioned; :data:`MIGRATIONS` upgrades an older file in place):

- ``sessions``      one row per chat session (start/end, backend name);
- ``interactions``  the raw log: every message of every session, never rewritten by sleep
                    (``consolidated`` marks rows that sleep already read);
- ``memories``      consolidated memories: text, kind (fact / preference / lesson),
                    subject/value keys, importance and its parts, mention and access
                    counts, times, provenance (interaction ids, JSON), ``superseded_by``,
                    ``archived`` (forgotten but restorable) and the embedding (float32 blob);
- ``memory_history``every change to a memory (add, merge, supersede, archive, restore,
                    rescore), so nothing is ever silently lost;
- ``sleep_runs``    one row per consolidation pass with its reference time, so a pass that
                    was killed is resumed with the same clock and gives the same result;
- ``meta``          schema version, embedder name, and ``generation`` (bumped whenever the
                    set of active memory vectors changes; the FAISS index records the
                    generation it was built at and is rebuilt when stale or missing).

The database runs in WAL mode; every multi-row change happens inside one transaction.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from memlm.core.errors import MemLMError

KINDS = ("fact", "preference", "lesson", "instruction")
#: identity facts and standing instructions are protected from decay; temporary states expire
CLASSES = ("identity", "instruction", "temporary", "ordinary")

_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    ended_at REAL,
    backend TEXT
);
CREATE TABLE IF NOT EXISTS interactions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id INTEGER REFERENCES sessions(id),
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    consolidated INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS memories (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT,
    value TEXT,
    importance REAL NOT NULL DEFAULT 0,
    novelty REAL NOT NULL DEFAULT 1,
    explicit INTEGER NOT NULL DEFAULT 0,
    mention_count INTEGER NOT NULL DEFAULT 1,
    access_count INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_accessed REAL,
    provenance TEXT NOT NULL DEFAULT '[]',
    superseded_by INTEGER REFERENCES memories(id),
    archived INTEGER NOT NULL DEFAULT 0,
    embedding BLOB
);
CREATE TABLE IF NOT EXISTS memory_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    memory_id INTEGER NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}',
    at REAL NOT NULL,
    sleep_run INTEGER
);
CREATE TABLE IF NOT EXISTS sleep_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    now REAL NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    phase TEXT NOT NULL DEFAULT 'start',
    stats TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS idx_interactions_pending ON interactions(consolidated, id);
"""

_V2 = """
ALTER TABLE memories ADD COLUMN strength REAL NOT NULL DEFAULT 1;
ALTER TABLE memories ADD COLUMN llm_importance REAL;
CREATE INDEX IF NOT EXISTS idx_memories_active ON memories(archived, superseded_by);
CREATE INDEX IF NOT EXISTS idx_memories_subject ON memories(subject);
CREATE INDEX IF NOT EXISTS idx_history_memory ON memory_history(memory_id);
"""

_V3 = """
ALTER TABLE memories ADD COLUMN embed_text TEXT;
"""

# v4: importance classes (identity / instruction / temporary / ordinary) that decay differently,
# expiry for temporary states, the person a fact is about, absolute dates beside relative words,
# ``available_at`` (when sleep made the memory usable: decay never counts time before it), and
# embeddings of the raw episodes so wake can search the log itself beside the memories.
_V4 = """
ALTER TABLE memories ADD COLUMN memory_class TEXT NOT NULL DEFAULT 'ordinary';
ALTER TABLE memories ADD COLUMN expires_at REAL;
ALTER TABLE memories ADD COLUMN person TEXT;
ALTER TABLE memories ADD COLUMN dates TEXT;
ALTER TABLE memories ADD COLUMN available_at REAL;
CREATE TABLE IF NOT EXISTS episode_vectors (
    interaction_id INTEGER NOT NULL REFERENCES interactions(id),
    embedder TEXT NOT NULL,
    embed_text TEXT NOT NULL,
    embedding BLOB NOT NULL,
    PRIMARY KEY (interaction_id, embedder)
);
"""

#: schema version -> SQL that upgrades from the previous version
MIGRATIONS: dict[int, str] = {1: _V1, 2: _V2, 3: _V3, 4: _V4}
SCHEMA_VERSION = max(MIGRATIONS)


@dataclass
class Memory:
    id: int
    text: str
    kind: str
    subject: str | None
    value: str | None
    importance: float
    novelty: float
    explicit: bool
    mention_count: int
    access_count: int
    created_at: float
    updated_at: float
    last_accessed: float | None
    provenance: list[int]
    superseded_by: int | None
    archived: bool
    strength: float
    llm_importance: float | None
    embedding: np.ndarray | None = field(default=None, repr=False)
    embed_text: str | None = None  # the text the embedding was computed from (None = text)
    memory_class: str = "ordinary"
    expires_at: float | None = None
    person: str | None = None  # who the fact is about, when not the user ("sister")
    dates: str | None = None  # absolute ISO dates resolved from relative words, comma-separated
    available_at: float | None = None

    @property
    def active(self) -> bool:
        return self.superseded_by is None and not self.archived


_MEM_COLS = (
    "id, text, kind, subject, value, importance, novelty, explicit, mention_count, access_count, "
    "created_at, updated_at, last_accessed, provenance, superseded_by, archived, strength, llm_importance, embedding, embed_text, "
    "memory_class, expires_at, person, dates, available_at"
)


def _row_to_memory(r: tuple) -> Memory:
    emb = np.frombuffer(r[18], dtype=np.float32).copy() if r[18] is not None else None
    return Memory(
        id=r[0], text=r[1], kind=r[2], subject=r[3], value=r[4], importance=float(r[5]), novelty=float(r[6]),
        explicit=bool(r[7]), mention_count=int(r[8]), access_count=int(r[9]), created_at=float(r[10]),
        updated_at=float(r[11]), last_accessed=r[12], provenance=json.loads(r[13]), superseded_by=r[14],
        archived=bool(r[15]), strength=float(r[16]), llm_importance=r[17], embedding=emb, embed_text=r[19],
        memory_class=r[20] or "ordinary", expires_at=r[21], person=r[22], dates=r[23], available_at=r[24],
    )


def _blob(vec: np.ndarray | None) -> bytes | None:
    return None if vec is None else np.asarray(vec, dtype=np.float32).tobytes()


class Store:
    """One SQLite connection to an LTML database (thread-safe through a lock)."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise MemLMError(f"LTML database not found: {self.path}; chat with --memory {self.path} first")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.DatabaseError as exc:
            raise MemLMError(f"cannot open LTML database {self.path} ({exc}); check the path or move the file away") from exc
        self._lock = threading.RLock()
        self._depth = 0
        self.migrate()

    # -- schema ---------------------------------------------------------------------
    def schema_version(self) -> int:
        try:
            row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:
            return 0
        except sqlite3.DatabaseError as exc:
            raise MemLMError(f"{self.path} is not an LTML database ({exc}); pass another --memory path") from exc
        return int(row[0]) if row else 0

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise MemLMError(
                f"{self.path} has LTML schema v{current}, newer than this code (v{SCHEMA_VERSION}); upgrade MemLM"
            )
        for version in range(current + 1, target + 1):
            with self.transaction() as c:
                for stmt in MIGRATIONS[version].split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(
                    "INSERT INTO meta(key, value) VALUES('schema_version', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (str(version),),
                )
        return self.schema_version()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); nested calls join the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.conn
                finally:
                    self._depth -= 1
                return
            self.conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
            finally:
                self._depth = 0

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- meta ---------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, str(value)),
            )

    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def bump_generation(self) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO meta(key, value) VALUES('generation', '1') "
                "ON CONFLICT(key) DO UPDATE SET value=CAST(value AS INTEGER) + 1"
            )

    # -- sessions and the raw log ----------------------------------------------------
    def start_session(self, backend: str = "", at: float | None = None) -> int:
        with self.transaction() as c:
            cur = c.execute("INSERT INTO sessions(started_at, backend) VALUES(?, ?)", (at or time.time(), backend))
            return int(cur.lastrowid)

    def end_session(self, session_id: int, at: float | None = None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE sessions SET ended_at=? WHERE id=?", (at or time.time(), session_id))

    def log(self, session_id: int | None, role: str, content: str, at: float | None = None) -> int:
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO interactions(session_id, role, content, created_at) VALUES(?, ?, ?, ?)",
                (session_id, role, content, at or time.time()),
            )
            return int(cur.lastrowid)

    def pending_interactions(self, limit: int | None = None) -> list[tuple[int, int, str, str, float]]:
        """Unconsolidated interactions, oldest first: (id, session_id, role, content, created_at)."""
        sql = "SELECT id, session_id, role, content, created_at FROM interactions WHERE consolidated=0 ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            return self.conn.execute(sql).fetchall()

    def _rows_by_id(self, select: str, column: str, value: int | None) -> list[tuple]:
        """``select`` in id order, limited to ``column = value`` unless ``value`` is None (all rows).

        ``column`` is one of this class's own column names, never user input."""
        where, args = ("", ()) if value is None else (f" WHERE {column}=?", (value,))
        with self._lock:
            return self.conn.execute(select + where + " ORDER BY id", args).fetchall()

    def interactions(self, session_id: int | None = None) -> list[tuple[int, int, str, str, float]]:
        return self._rows_by_id("SELECT id, session_id, role, content, created_at FROM interactions",
                                "session_id", session_id)

    # -- memories ---------------------------------------------------------------------
    def memories(self, active_only: bool = True, with_embeddings: bool = True) -> list[Memory]:
        cols = _MEM_COLS if with_embeddings else _MEM_COLS.replace("embedding", "NULL")
        sql = f"SELECT {cols} FROM memories"
        if active_only:
            sql += " WHERE superseded_by IS NULL AND archived=0"
        with self._lock:
            return [_row_to_memory(r) for r in self.conn.execute(sql + " ORDER BY id").fetchall()]

    def get(self, memory_id: int) -> Memory:
        with self._lock:
            row = self.conn.execute(f"SELECT {_MEM_COLS} FROM memories WHERE id=?", (memory_id,)).fetchone()
        if row is None:
            raise MemLMError(f"no memory with id {memory_id}; list them with python -m memlm.apps.ltml list --db {self.path}")
        return _row_to_memory(row)

    def get_many(self, memory_ids: Iterable[int], with_embeddings: bool = False) -> list[Memory]:
        """Memories by id, in the order given (missing ids are skipped)."""
        ids = [int(i) for i in memory_ids]
        if not ids:
            return []
        cols = _MEM_COLS if with_embeddings else _MEM_COLS.replace("embedding", "NULL")
        with self._lock:
            rows = self.conn.execute(f"SELECT {cols} FROM memories WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall()
        found = {r[0]: _row_to_memory(r) for r in rows}
        return [found[i] for i in ids if i in found]

    def by_subject(self, subject: str) -> list[Memory]:
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {_MEM_COLS} FROM memories WHERE subject=? AND superseded_by IS NULL AND archived=0 ORDER BY id",
                (subject,),
            ).fetchall()
        return [_row_to_memory(r) for r in rows]

    def add_memory(
        self,
        text: str,
        kind: str,
        embedding: np.ndarray | None,
        at: float,
        subject: str | None = None,
        value: str | None = None,
        novelty: float = 1.0,
        explicit: bool = False,
        provenance: Iterable[int] = (),
        llm_importance: float | None = None,
        sleep_run: int | None = None,
        embed_text: str | None = None,
        memory_class: str = "ordinary",
        expires_at: float | None = None,
        person: str | None = None,
        dates: str | None = None,
        available_at: float | None = None,
    ) -> int:
        if kind not in KINDS:
            kind = "fact"
        if memory_class not in CLASSES:
            memory_class = "ordinary"
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO memories(text, kind, subject, value, novelty, explicit, created_at, updated_at, provenance, "
                "embedding, llm_importance, embed_text, memory_class, expires_at, person, dates, available_at) "
                "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (text, kind, subject, value, float(novelty), int(explicit), at, at, json.dumps(sorted(set(provenance))),
                 _blob(embedding), llm_importance, embed_text, memory_class, expires_at, person, dates, available_at),
            )
            mid = int(cur.lastrowid)
            self.record(mid, "add", {"text": text, "kind": kind, "subject": subject}, at, sleep_run)
            self.bump_generation()
            return mid

    def record(self, memory_id: int, action: str, detail: dict, at: float, sleep_run: int | None = None) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO memory_history(memory_id, action, detail, at, sleep_run) VALUES(?,?,?,?,?)",
                (memory_id, action, json.dumps(detail, sort_keys=True), at, sleep_run),
            )

    def history(self, memory_id: int | None = None) -> list[tuple[int, int, str, dict, float]]:
        rows = self._rows_by_id("SELECT id, memory_id, action, detail, at FROM memory_history", "memory_id", memory_id)
        return [(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    def update_memory(self, memory_id: int, **fields) -> None:
        if not fields:
            return
        if "provenance" in fields:
            fields["provenance"] = json.dumps(sorted(set(fields["provenance"])))
        if "embedding" in fields:
            fields["embedding"] = _blob(fields["embedding"])
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as c:
            c.execute(f"UPDATE memories SET {sets} WHERE id=?", (*fields.values(), memory_id))

    def note_access(self, memory_ids: Iterable[int], at: float | None = None) -> None:
        ids = list(memory_ids)
        if not ids:
            return
        at = at or time.time()
        with self.transaction() as c:
            c.executemany(
                "UPDATE memories SET access_count=access_count+1, last_accessed=? WHERE id=?", [(at, i) for i in ids]
            )

    # -- episode vectors (wake searches the raw log beside the memories) ----------------
    def user_episodes(self) -> list[tuple[int, int, str, float, str | None]]:
        """Every user message with the message just before it in its session when that is the
        assistant's: (id, session_id, content, created_at, preceding assistant text or None)."""
        with self._lock:
            return self.conn.execute(
                "SELECT u.id, u.session_id, u.content, u.created_at, "
                "(SELECT CASE WHEN a.role='assistant' THEN a.content END FROM interactions a "
                " WHERE a.session_id IS u.session_id AND a.id < u.id ORDER BY a.id DESC LIMIT 1) "
                "FROM interactions u WHERE u.role='user' ORDER BY u.id"
            ).fetchall()

    def preceding_assistant(self, interaction_id: int) -> str | None:
        """The assistant message just before ``interaction_id`` in its session (what a short answer answers)."""
        with self._lock:
            row = self.conn.execute(
                "SELECT a.role, a.content FROM interactions a JOIN interactions u ON u.id=? "
                "WHERE a.session_id IS u.session_id AND a.id < u.id ORDER BY a.id DESC LIMIT 1", (interaction_id,)
            ).fetchone()
        return row[1] if row and row[0] == "assistant" else None

    def opening_answer(self, interaction_id: int) -> str | None:
        """For a message that opens its session: the assistant's last answer in an earlier session
        (what feedback there refers to); None when the message does not open its session."""
        with self._lock:
            row = self.conn.execute(
                "SELECT u.session_id, (SELECT COUNT(*) FROM interactions p WHERE p.session_id IS u.session_id "
                "AND p.id < u.id) FROM interactions u WHERE u.id=?", (interaction_id,)).fetchone()
            if not row or row[1]:
                return None
            prev = self.conn.execute(
                "SELECT content FROM interactions WHERE role='assistant' AND id < ? AND session_id IS NOT ? "
                "ORDER BY id DESC LIMIT 1", (interaction_id, row[0])).fetchone()
        return prev[0] if prev else None

    def episode_vectors(self, embedder: str) -> dict[int, np.ndarray]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT interaction_id, embedding FROM episode_vectors WHERE embedder=?", (embedder,)).fetchall()
        return {int(i): np.frombuffer(b, dtype=np.float32) for i, b in rows}

    def put_episode_vectors(self, embedder: str, rows: Iterable[tuple[int, str, np.ndarray]]) -> None:
        with self.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO episode_vectors(interaction_id, embedder, embed_text, embedding) VALUES(?,?,?,?)",
                [(int(i), embedder, t, _blob(v)) for i, t, v in rows],
            )

    def forget(self, memory_id: int, at: float | None = None, reason: dict | None = None,
               sleep_run: int | None = None) -> None:
        """Archive a memory because the user asked (restorable with :meth:`restore`; the history keeps why).

        The only way besides a newer value that a protected memory (identity, instruction) leaves."""
        at = at or time.time()
        with self.transaction():
            self.update_memory(memory_id, archived=1)
            self.record(memory_id, "forget", reason or {}, at, sleep_run)
            self.bump_generation()

    def restore(self, memory_id: int, at: float | None = None) -> None:
        """Bring an archived (forgotten) memory back."""
        m = self.get(memory_id)
        at = at or time.time()
        with self.transaction():
            self.update_memory(memory_id, archived=0, last_accessed=at)
            self.record(memory_id, "restore", {"was_archived": m.archived}, at)
            self.bump_generation()

    # -- statistics ------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            q = self.conn.execute
            raw_rows, raw_bytes = q("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(content AS BLOB))), 0) FROM interactions").fetchone()
            pending = q("SELECT COUNT(*) FROM interactions WHERE consolidated=0").fetchone()[0]
            active, active_bytes = q(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(text AS BLOB))), 0) FROM memories "
                "WHERE superseded_by IS NULL AND archived=0"
            ).fetchone()
            superseded = q("SELECT COUNT(*) FROM memories WHERE superseded_by IS NOT NULL").fetchone()[0]
            archived = q("SELECT COUNT(*) FROM memories WHERE archived=1").fetchone()[0]
            sessions = q("SELECT COUNT(*) FROM sessions").fetchone()[0]
            history = q("SELECT COUNT(*) FROM memory_history").fetchone()[0]
        return {
            "sessions": sessions,
            "interactions": raw_rows,
            "interaction_bytes": raw_bytes,
            "pending_interactions": pending,
            "active_memories": active,
            "active_memory_bytes": active_bytes,
            "superseded_memories": superseded,
            "archived_memories": archived,
            "history_rows": history,
            "schema_version": self.schema_version(),
            "embedder": self.get_meta("embedder"),
        }

"""The usage store: requests, tokens and errors per key, model, adapter and deployment, and
replica-GPU-seconds per deployment, in a SQL database that outlives replicas.

Where: `$PLATFORM_USAGE_DB`, a SQLAlchemy URL (on Kubernetes the platform's Postgres, e.g.
`postgresql+psycopg2://user:pass@postgres:5432/usage`, set in the serving pods' env), else SQLite
at `$PLATFORM_HOME/usage.db` (the local stack). `PLATFORM_USAGE_DB=off` records nothing.

How: each ingress replica adds a finished request to an in-memory tally keyed by (minute, key,
model, adapter) — a dict update under a lock, no I/O on the request path — and a background
thread writes the tally every FLUSH_S seconds, one INSERT per row, and at replica shutdown. Rows
are summed when read, so replicas never update each other's rows. A write that fails keeps its
rows for the next flush. What a replica tallied in its last FLUSH_S is lost if its process is
killed without a shutdown (a graceful stop flushes).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict

log = logging.getLogger(__name__)
USAGE_DB_ENV = "PLATFORM_USAGE_DB"
FLUSH_S = 1.0
REPLICA_ROW_S = 60.0  # a GPU replica's seconds are written once a minute (and at shutdown)
GROUPS = ("key", "model", "adapter", "deployment")
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "errors")


def usage_db_url(environ=None) -> str | None:
    """The store's SQLAlchemy URL from `$PLATFORM_USAGE_DB` or PLATFORM_HOME; None when `off`."""
    environ = os.environ if environ is None else environ
    value = (environ.get(USAGE_DB_ENV) or "").strip()
    if value.lower() == "off":
        return None
    if value:
        return value
    from llmplatform import paths

    home = paths.platform_home() if not environ.get("PLATFORM_HOME") else os.path.expanduser(environ["PLATFORM_HOME"])
    return f"sqlite:///{os.path.join(str(home), 'usage.db')}"


def _tables():
    from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table

    md = MetaData()
    usage = Table("request_usage", md, Column("id", Integer, primary_key=True, autoincrement=True),
                  Column("minute", Integer, nullable=False),  # epoch seconds at the start of the minute (UTC)
                  Column("deployment", String(128), nullable=False), Column("key", String(128), nullable=False),
                  Column("model", String(256), nullable=False), Column("adapter", String(256), nullable=False),
                  Column("replica", String(128), nullable=False, default=""),  # the ingress replica that served them
                  *(Column(c, Integer, nullable=False, default=0) for c in COUNTS),
                  Index("ix_request_usage_minute", "minute"))
    replicas = Table("replica_usage", md, Column("id", Integer, primary_key=True, autoincrement=True),
                     Column("minute", Integer, nullable=False), Column("deployment", String(128), nullable=False),
                     Column("replica", String(128), nullable=False),
                     Column("gpu_seconds", Float, nullable=False), Column("seconds", Float, nullable=False),
                     Index("ix_replica_usage_minute", "minute"))
    return md, usage, replicas


class UsageStore:
    """The SQL tables behind `platformctl usage` (created when missing)."""

    def __init__(self, url: str):
        from sqlalchemy import create_engine, event

        self.url = url
        sqlite = url.startswith("sqlite")
        if sqlite and url.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(os.path.abspath(url.removeprefix("sqlite:///"))) or ".", exist_ok=True)
        self.engine = create_engine(url, connect_args={"timeout": 30} if sqlite else {}, pool_pre_ping=not sqlite)
        if sqlite:  # several replica processes write at once: WAL lets readers and one writer overlap
            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _record):
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
        self.md, self.usage, self.replicas = _tables()
        from sqlalchemy.exc import DatabaseError

        for attempt in range(10):
            try:
                self.md.create_all(self.engine, checkfirst=True)
                break
            except DatabaseError:  # another replica created a table between the check and the CREATE
                if attempt == 9:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def add(self, rows: list[dict], replica_rows: list[dict] = ()) -> None:
        with self.engine.begin() as conn:
            if rows:
                conn.execute(self.usage.insert(), rows)
            if replica_rows:
                conn.execute(self.replicas.insert(), list(replica_rows))

    def report(self, since: float, by: str) -> list[dict]:
        """Totals per `by` (key|model|adapter|deployment) since epoch `since`, largest first."""
        from sqlalchemy import func, select

        if by not in GROUPS:
            raise ValueError(f"by must be one of {', '.join(GROUPS)}, not {by!r}")
        start = int(since) // 60 * 60
        col = self.usage.c[by]
        q = (select(col.label(by), *(func.sum(self.usage.c[c]).label(c) for c in COUNTS))
             .where(self.usage.c.minute >= start).group_by(col))
        with self.engine.connect() as conn:
            rows = [{by: r[0], **{c: int(r[i + 1] or 0) for i, c in enumerate(COUNTS)}} for r in conn.execute(q)]
            if by == "deployment":
                rq = (select(self.replicas.c.deployment, func.sum(self.replicas.c.gpu_seconds))
                      .where(self.replicas.c.minute >= start).group_by(self.replicas.c.deployment))
                gpu = {d: float(s or 0.0) for d, s in conn.execute(rq)}
                known = {r["deployment"] for r in rows}
                rows += [{"deployment": d, **{c: 0 for c in COUNTS}} for d in gpu if d not in known]
                for r in rows:
                    r["replica_gpu_seconds"] = round(gpu.get(r["deployment"], 0.0), 3)
        return sorted(rows, key=lambda r: (-r["prompt_tokens"] - r["completion_tokens"], -r["requests"], str(r[by])))

    def close(self) -> None:
        self.engine.dispose()


class UsageRecorder:
    """One replica's tally and its writer thread (see the module docstring)."""

    def __init__(self, url: str, deployment: str, replica: str = "", gpus: float = 0.0, flush_s: float = FLUSH_S):
        self.deployment, self.replica, self.gpus, self.flush_s = deployment, replica, gpus, flush_s
        self._tally: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._alive_since = time.time()
        self._store: UsageStore | None = None
        self._url = url
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def record(self, key: str, model: str, adapter: str, prompt_tokens: int = 0, completion_tokens: int = 0,
               error: bool = False) -> None:
        """Count one finished request (cheap: no I/O)."""
        minute = int(time.time()) // 60 * 60
        with self._lock:
            t = self._tally[(minute, key, model, adapter)]
            t[0] += 1
            t[1] += prompt_tokens
            t[2] += completion_tokens
            t[3] += int(error)

    def flush(self, final: bool = False) -> None:
        """Write what was tallied (and, with `gpus`, this replica's GPU-seconds once a minute)."""
        with self._lock:
            tally, self._tally = self._tally, defaultdict(lambda: [0, 0, 0, 0])
            now = time.time()
            elapsed = now - self._alive_since
            if self.gpus and (final or elapsed >= REPLICA_ROW_S):
                self._alive_since = now
            else:
                elapsed = 0.0
        rows = [{"minute": m, "deployment": self.deployment, "key": k, "model": mo, "adapter": a, "replica": self.replica,
                 **dict(zip(COUNTS, counts))} for (m, k, mo, a), counts in tally.items()]
        replica_rows = ([{"minute": int(now) // 60 * 60, "deployment": self.deployment, "replica": self.replica,
                          "gpu_seconds": elapsed * self.gpus, "seconds": elapsed}] if elapsed else [])
        if not rows and not replica_rows:
            return
        try:
            if self._store is None:
                self._store = UsageStore(self._url)
            self._store.add(rows, replica_rows)
        except Exception as exc:  # the store is down: keep the rows for the next flush, never fail a request
            log.warning("usage store %s: write failed (%s: %s); retrying", self._url.split("@")[-1], type(exc).__name__, exc)
            with self._lock:
                for (m, k, mo, a), counts in tally.items():
                    t = self._tally[(m, k, mo, a)]
                    for i, c in enumerate(counts):
                        t[i] += c
                self._alive_since -= elapsed

    def _run(self) -> None:
        try:  # connect (and import SQLAlchemy) now, so the first flush of counts does not wait for it
            self._store = UsageStore(self._url)
        except Exception as exc:
            log.warning("usage store %s: not reachable yet (%s: %s); retrying at each flush", self._url.split("@")[-1],
                        type(exc).__name__, exc)
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self.flush(final=True)
            if self._tally:  # that write failed: one more try before the counts go with the process
                self.flush(final=True)


def replica_gpus(plan) -> float:
    """Accelerators one replica of a resolved serve plan reserves (its placement bundles)."""
    placement = plan["placement"]
    accel = placement.get("accelerator")
    return float(sum(b.get(accel, 0.0) for b in placement["bundles"])) if accel else 0.0


def gpu_seconds_recorder(plan, replica: str) -> UsageRecorder | None:
    """A recorder of this engine replica's GPU-seconds for `platformctl usage --by deployment`;
    None on CPU or with the store off."""
    gpus, url = replica_gpus(plan), usage_db_url()
    return UsageRecorder(url, plan.spec.name, replica, gpus=gpus) if gpus and url else None

"""`esr bench --ui`: the sessions list and search of `esr ui` at scale.

A data dir of real recordings is generated (10,000 sessions, 10 million
events by default), written through recording.Writer as the recorder
writes them, and indexed by esr.index as `esr ui` indexes them: what is
timed then went through the same code as on a real host. Requests go to the
Flask app in this process, so the figures are server time: routing, the
index's queries and the page's rendering, without the network. Needs no root.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from esr import index, schema
from esr.datadir import DataDir
from esr.recording import KIND_END, KIND_EVENTS, KIND_START, Writer
from esr.ui.app import create_app

FRAME = 2000  # events per frame: a busy session's flush
DAY_NS = 86_400 * 10**9
EPOCH = 1_790_000_000 * 10**9

PROGRAMS = [
    "ls", "cat", "grep", "vim", "less", "git", "make", "gcc", "python3", "curl", "ssh",
    "scp", "tar", "find", "ps", "top", "systemctl", "journalctl", "docker", "kubectl",
    "sed", "awk", "sort", "head", "tail", "id", "uname", "df", "du", "rsync",
]  # fmt: skip
COMMON_FILES = [
    b"/etc/ld.so.cache", b"/lib/x86_64-linux-gnu/libc.so.6", b"/etc/passwd", b"/etc/group",
    b"/etc/nsswitch.conf", b"/usr/lib/locale/locale-archive", b"/etc/localtime",
    b"/lib/x86_64-linux-gnu/libselinux.so.1", b"/lib/x86_64-linux-gnu/libpcre2-8.so.0",
    b"/proc/filesystems", b"/dev/null", b"/dev/tty", b"/etc/hosts", b"/etc/resolv.conf",
]  # fmt: skip
WORDS = [
    "report", "deploy", "backup", "config", "release", "invoice", "secret", "staging",
    "payroll", "metrics", "archive", "customer", "firewall", "ledger", "migration",
]  # fmt: skip
PATH_DIRS = [b"/usr/local/sbin", b"/usr/local/bin", b"/usr/sbin"]


class Corpus:
    """Sessions like an ops team's: 50 logins from 40 addresses over 30 days;
    commands from a common vocabulary with arguments that are often unique;
    opens mostly of the same system files, plus project files of their own."""

    def __init__(self, sessions: int, events: int, seed: int = 1):
        self.rng = random.Random(seed)
        self.sessions = sessions
        self.events = events
        self.logins = [f"user{i:02d}" for i in range(50)]
        self.addrs = [f"10.{i // 10}.{i % 10}.{7 + i}" for i in range(40)]
        self.dests = [f"192.168.{i // 50}.{i % 50 + 1}" for i in range(200)]

    def sizes(self) -> list[int]:
        """Events per session: most short, a few long, exactly events in all."""
        weights = [self.rng.paretovariate(1.5) for _ in range(self.sessions)]
        scale = self.events / sum(weights)
        sizes = [max(3, int(w * scale)) for w in weights]
        sizes[0] += self.events - sum(sizes)
        if sizes[0] < 3:
            raise ValueError("too few events for that many sessions")
        return sizes

    def write(self, datadir: DataDir) -> None:
        os.makedirs(datadir.sessions_dir, exist_ok=True)
        for n, size in enumerate(self.sizes()):
            self._session(datadir, n, size)
            if n % 500 == 499:
                print(f"  generated {n + 1} of {self.sessions} sessions", file=sys.stderr)

    def _session(self, datadir: DataDir, n: int, size: int) -> None:
        rng = self.rng
        sid = f"bench-{n:06d}"
        start = EPOCH + rng.randrange(30 * DAY_NS)
        login = rng.choice(self.logins)
        writer = Writer.create(datadir.recording(sid), sid, 1)
        writer.append(
            KIND_START,
            [
                schema.SessionStart(
                    0, start, sid, "bench-server", "bench-host", login, login,
                    remote_addr=rng.choice(self.addrs), service="sshd", tty="/dev/pts/0",
                    seed_pid=1000, interactive=True,
                )
            ],
        )  # fmt: skip
        project = [
            f"/home/{login}/{rng.choice(WORDS)}-{n}/{rng.choice(WORDS)}{i}.txt".encode()
            for i in range(8)
        ]
        ts = start
        ei = 1
        pid = 2000
        frame: list[schema.Event] = []
        counts = [0, 0, 0]
        remaining = size - 2  # start and end
        while remaining > 0:
            ts += rng.randrange(1_000, 50_000_000)
            roll = rng.random()
            if roll < 0.02:
                pid += 1
                program = rng.choice(PROGRAMS)
                argv = [
                    rng.choice(WORDS).encode(),
                    f"{rng.choice(WORDS)}-{rng.randrange(100_000)}".encode(),
                ]
                # Some go through a PATH lookup: failed tries, then the exec.
                for d in PATH_DIRS[: min(rng.choice((0, 0, 3)), remaining - 1)]:
                    frame.append(schema.Command(
                        ei, ts, pid, 1999, 42, program.encode(), d + b"/" + program.encode(),
                        argv, -2, 1000, 1000,
                    ))  # fmt: skip
                    ei += 1
                    counts[0] += 1
                    remaining -= 1
                frame.append(schema.Command(
                    ei, ts, pid, 1999, 42, program.encode(), b"/usr/bin/" + program.encode(),
                    argv, 0, 1000, 1000, has_tty=True,
                ))  # fmt: skip
                counts[0] += 1
            elif roll < 0.03:
                frame.append(schema.Network(
                    ei, ts, pid, 42, b"curl", 4, "10.0.0.2", 40000 + ei % 20000,
                    rng.choice(self.dests), rng.choice((22, 80, 443, 5432)), 0,
                ))  # fmt: skip
                counts[2] += 1
            else:
                path = rng.choice(COMMON_FILES) if rng.random() < 0.7 else rng.choice(project)
                frame.append(schema.Disk(ei, ts, pid, 42, b"bash", path, 0, 3))
                counts[1] += 1
            ei += 1
            remaining -= 1
            if len(frame) >= FRAME or remaining <= 0:
                writer.append(KIND_EVENTS, frame, records=counts)
                frame, counts = [], [0, 0, 0]
        writer.append(
            KIND_END,
            [schema.SessionEnd(ei, ts + 1_000_000, "exited", True, True, [0, 0, 0], [0, 0, 0], 0)],
        )
        writer.close()


def _percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _timed_get(client, path: str, **params) -> float:
    t0 = time.perf_counter()
    response = client.get(path, query_string=params)
    elapsed = time.perf_counter() - t0
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} {params}: {response.status_code}")
    return elapsed


def queries(rng: random.Random, corpus: Corpus) -> list[str]:
    """What reviewers search for: a command, a word of an argument, a file,
    a destination, a prefix, two words; common and rare."""
    out = []
    for _ in range(40):
        out += [
            rng.choice(PROGRAMS),
            f"{rng.choice(WORDS)}-{rng.randrange(100_000)}",
            f"{rng.choice(PROGRAMS)} {rng.choice(WORDS)}",
            rng.choice(["/etc/passwd", "/etc/resolv.conf", "libc.so.6", "passw", "resolv"]),
            rng.choice(corpus.dests),
            f"{rng.choice(WORDS)}{rng.randrange(8)}.txt",
        ]
    return out


def measure(sessions: int = 10_000, events: int = 10_000_000, keep: str | None = None) -> dict:
    """keep: a directory to generate the corpus into, or to reuse it from
    when it holds one of the same size; a temporary one otherwise."""
    if keep:
        os.makedirs(keep, exist_ok=True)
        return _measure(keep, sessions, events)
    with tempfile.TemporaryDirectory(prefix="esr-bench-ui-") as work:
        return _measure(work, sessions, events)


def _measure(work: str, sessions: int, events: int) -> dict:
    datadir = DataDir(os.path.join(work, "data"))
    corpus = Corpus(sessions, events)
    report: dict = {"sessions": sessions, "events": events}
    marker = os.path.join(work, "corpus")
    size = f"{sessions} {events}\n"
    if not (os.path.exists(marker) and Path(marker).read_text() == size):
        shutil.rmtree(datadir.path, ignore_errors=True)
        t0 = time.perf_counter()
        corpus.write(datadir)
        report["generate_s"] = round(time.perf_counter() - t0, 1)
        with open(marker, "w") as f:
            f.write(size)
    report["recordings_mib"] = round(
        sum(os.path.getsize(datadir.recording(s)) for s in datadir.sids()) / 2**20, 1
    )

    # Indexed from nothing every run: how long a first `esr ui` takes.
    index_path = os.path.join(work, "index.sqlite")
    for name in (index_path, index_path + "-wal", index_path + "-shm"):
        if os.path.exists(name):
            os.unlink(name)
    ix = index.Index(index_path, datadir)
    t0 = time.perf_counter()
    done = ix.refresh()
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ix.refresh()
    report["index"] = {
        "events_read": done.events,
        "seconds": round(seconds, 1),
        "events_per_s": round(done.events / seconds),
        "rows": ix.db.execute("SELECT count(*) FROM hits").fetchone()[0],
        "mib": round(os.path.getsize(index_path) / 2**20, 1),
        "unchanged_pass_ms": round((time.perf_counter() - t0) * 1000, 1),
    }
    ix.close()

    app = create_app(datadir, index_path, "bench")
    client = app.test_client()
    client.get("/", query_string={"token": "bench"})  # the cookie, as a browser holds it
    # A running UI has its templates compiled and the index in the page cache.
    for q in queries(random.Random(8), corpus)[:30]:
        client.get("/search", query_string={"q": q})
    rng = random.Random(7)
    search = [_timed_get(client, "/search", q=q) for q in queries(rng, corpus)]
    pages: list[dict] = [
        {},
        {"sort": "duration"},
        {"sort": "commands", "order": "asc"},
        {"sort": "login"},
        {"sort": "lost"},
        {"page": "100"},
        {"user": corpus.logins[3]},
        {"from": "2026-09-22T00:00", "to": "2026-09-29T00:00"},
        {"command": PROGRAMS[5]},
        {"command": WORDS[2], "user": corpus.logins[9]},
    ]
    for params in pages:
        client.get("/", query_string=params)
    listing = [_timed_get(client, "/", **params) for _ in range(10) for params in pages]
    report["search_page"] = _percentiles(search)
    report["list_page"] = _percentiles(listing)
    db = index.connect(index_path)
    raw = []
    for q in queries(rng, corpus):
        t0 = time.perf_counter()
        index.search(db, q, limit=51)
        raw.append(time.perf_counter() - t0)
    db.close()
    report["search_query"] = _percentiles(raw)
    return report

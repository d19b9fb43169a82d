"""Structured logs: one logfmt line per event on stderr, where journald
collects them."""

from __future__ import annotations

import codecs
import sys
import time

# Looked up now: an upgrade replaces the files of the daemon it is about to
# restart, whose last lines, on its way out, could not import the codec.
_escape = codecs.lookup("unicode_escape").encode


def _value(v) -> str:
    s = str(v)
    if s and not any(c in s for c in ' "=\\') and s.isprintable():
        return s
    return '"' + _escape(s)[0].decode("ascii").replace('"', '\\"') + '"'


def counts(by_name: dict[str, int]) -> str:
    """Counts by name as one logfmt value: command:3,disk:120,network:1."""
    return ",".join(f"{name}:{n}" for name, n in by_name.items())


def log(event: str, level: str = "info", **fields) -> None:
    parts = [
        f"time={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        f"level={level}",
        f"event={event}",
    ]
    parts += [f"{k}={_value(v)}" for k, v in fields.items() if v not in (None, "")]
    try:
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()
    except OSError:
        pass

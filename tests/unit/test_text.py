"""What esr prints as text: whatever a session's fields hold, no byte
reaches the terminal raw."""

from __future__ import annotations

import pytest

from esr import schema, show
from esr.errors import one_line

EVIL = "evil\x1b]0;pwn\x07\nFORGED"


def _raw(text: str) -> bool:
    return any(c in text for c in "\x1b\x07\n\r")


@pytest.mark.parametrize("field", ["login", "user", "remote_addr", "service", "tty", "sid"])
def test_every_session_start_field_is_escaped(field):
    values = dict(sid="s", server_id="srv", server_hostname="h", login="a", user="a")
    values[field] = EVIL
    start = schema.SessionStart(0, 1, **values)
    text = start.describe()
    assert not _raw(text) and "\\x1b]0;pwn\\x07\\x0aFORGED" in text


def test_session_end_and_lost_reasons_are_escaped():
    end = schema.SessionEnd(9, 1, EVIL, True, False, [0] * 3, [0] * 3, 0)
    lost = schema.Lost(8, 1, [0, 1, 0], 0, EVIL, [3, 7])
    assert not _raw(end.describe()) and not _raw(lost.describe())


def test_the_sessions_listing_escapes_login_and_user():
    row = {
        "sid": "s",
        "start": None,
        "end": None,
        "login": EVIL,
        "user": EVIL + "2",
        "command": EVIL,
        "events": {"command": 0, "disk": 0, "network": 0},
        "lost": {"command": 0, "disk": 0, "network": 0},
        "state": "open",
        "damaged": None,
    }
    lines = show.sessions_text([row]).splitlines()
    assert len(lines) == 2 and not _raw(lines[1]) and "FORGED" in lines[1]


def test_an_error_echoing_input_stays_one_line():
    assert one_line(f"no session {EVIL}") == "no session evil\\x1b]0;pwn\\x07\\nFORGED"

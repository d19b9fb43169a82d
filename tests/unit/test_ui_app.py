"""The web app of `esr ui` without a browser: the token on every request,
the headers, escaping of every recorded string, the downloads; and its
command-line errors. tests/test_ui.py drives it in Chromium."""

from __future__ import annotations

import json
import re
import socket

import pytest

from esr import index, recording
from esr.datadir import DataDir
from esr.errors import UsageError
from esr.ui import server
from esr.ui.app import create_app
from helpers import Session

TOKEN = "t0ken-for-tests"
XSS = [b"<script>alert(1)</script>", b'"><img src=x onerror=alert(2)>', b"\x1b[31mred\x1b[0m"]


@pytest.fixture
def data(tmp_path):
    data = tmp_path / "data"
    s = Session(data, "s1", login="<b>mallory</b>", remote_addr='"><svg onload=alert(3)>')
    s.command(100, 1, b"/usr/bin/bash")
    s.command(101, 100, b"/usr/bin/echo", *XSS)
    s.open(101, b"/tmp/" + XSS[1], flags=0o101)
    s.command(102, 100, b"/usr/bin/cat", b"/etc/hostname", dt=2.0)
    s.end()
    return data


@pytest.fixture
def client(data, tmp_path):
    path = str(tmp_path / "index.sqlite")
    index.Index(path, DataDir(str(data))).refresh()
    app = create_app(DataDir(str(data)), path, TOKEN)
    return app.test_client()


@pytest.fixture
def browser(client):
    """A client holding the cookie, as a browser does after the first visit."""
    r = client.get(f"/?token={TOKEN}")
    assert r.status_code == 303
    return client


@pytest.mark.parametrize(
    "url",
    [
        "/",
        "/search?q=echo",
        "/session/s1",
        "/session/s1/cast",
        "/session/s1/events.jsonl",
        "/session/s1/recording.esr",
        "/static/session.js",
        "/static/nothing-here",
        "/session/nope",
    ],
)
def test_without_the_token_everything_is_401(client, url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "esr_ui_token=wrong"}):
        r = client.get(url, headers=headers)
        assert r.status_code == 401 and b"access token" in r.data
    assert client.get(url + ("&" if "?" in url else "?") + "token=wrong").status_code == 401
    assert client.post(url).status_code == 401


def test_the_token_sets_a_strict_cookie_and_leaves_the_address(client):
    r = client.get(f"/search?q=cat&token={TOKEN}")
    assert r.status_code == 303 and r.headers["Location"] == "/search?q=cat"
    cookie = r.headers["Set-Cookie"]
    assert f"esr_ui_token={TOKEN}" in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert client.get("/search?q=cat").status_code == 200


def test_the_redirect_stays_on_this_site(client):
    r = client.get(
        "/", environ_overrides={"PATH_INFO": "//evil.example/x", "QUERY_STRING": f"token={TOKEN}"}
    )
    assert r.headers["Location"] == "/evil.example/x"


def test_a_bearer_token_works_too(client):
    r = client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


def test_it_offers_no_write(browser):
    for method in ("post", "put", "delete", "patch"):
        assert getattr(browser, method)("/session/s1").status_code == 405


def test_every_response_has_a_strict_policy(browser):
    for url in ("/", "/session/s1", "/static/ui.css", "/session/nope"):
        headers = browser.get(url).headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"


def page_tags(html: str) -> list[str]:
    return re.findall(r"<[a-zA-Z][^>]*>", html)


LOGIN = "&lt;b&gt;mallory&lt;/b&gt;"
REMOTE = "&#34;&gt;&lt;svg onload=alert(3)&gt;"
SCRIPT = "&lt;script&gt;alert(1)&lt;/script&gt;"
IMG = "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;"


@pytest.mark.parametrize(
    "url, escaped",
    [
        ("/", [LOGIN, REMOTE]),
        ("/search?q=echo", [SCRIPT, LOGIN]),
        ("/search?q=tmp", [IMG]),
        ("/session/s1", [LOGIN, REMOTE, SCRIPT, IMG]),
    ],
)
def test_recorded_strings_are_text_never_markup(browser, url, escaped):
    html = browser.get(url).get_data(as_text=True)
    tags = page_tags(html)
    assert not [t for t in tags if re.search(r"\son\w+=", t)], "an event handler attribute"
    assert not [t for t in tags if re.search(r"\sstyle=", t)], "an inline style"
    assert not [t for t in tags if t.startswith(("<img", "<svg", "<b>"))]
    scripts = [t for t in tags if t.startswith("<script")]
    assert all(re.fullmatch(r'<script src="/static/[^"]+" defer>', t) for t in scripts)
    assert "\x1b" not in html
    for text in escaped:
        assert text in html


def test_the_session_page(browser):
    html = browser.get("/session/s1").get_data(as_text=True)
    assert 'data-cast="/session/s1/cast"' in html
    # The timeline: each command with its offset from the start, in seconds.
    rows = re.findall(r'<li id="ei-(\d+)"[^>]*data-t="([\d.]+)"', html)
    assert [(int(ei), float(t)) for ei, t in rows] == [(1, 0.5), (2, 1.0), (4, 3.001)]
    assert "\\x1b[31mred\\x1b[0m" in html
    assert "intact: 3 frames" in html and "banner bad" not in html


def test_a_search_result_links_to_its_moment(browser):
    html = browser.get("/search?q=hostname").get_data(as_text=True)
    assert 'href="/session/s1?ei=4"' in html and "<mark>hostname</mark>" in html
    page = browser.get("/session/s1?ei=4").get_data(as_text=True)
    assert 'data-at="3.001000"' in page


def test_a_process_a_debugger_reached_says_so(tmp_path):
    data = tmp_path / "data"
    s = Session(data, "reach")
    s.command(100, 1, b"/usr/bin/gdb", b"-p", b"4000")
    s.ptrace(100, "attach", 4000, XSS[0])
    s.command(4100, 4000, b"/bin/sh", b"-c", b"id")
    s.end()
    index_path = str(tmp_path / "index.sqlite")
    index.Index(index_path, DataDir(str(data))).refresh()
    app = create_app(DataDir(str(data)), index_path, TOKEN)
    html = app.test_client().get("/session/reach", headers={"Authorization": f"Bearer {TOKEN}"})
    text = html.get_data(as_text=True)
    assert "Outside the session until attached to by pid 100 <code>gdb</code>" in text
    # Quoted as argv is, then escaped.
    assert "ptrace <code>attach 4000 (&#39;&lt;script&gt;alert(1)&lt;/script&gt;&#39;)" in text
    assert "<script>alert" not in text


def test_damage_and_losses_are_banners(tmp_path):
    data = tmp_path / "data"
    s = Session(data, "lossy")
    s.command(100, 1, b"/usr/bin/bash")
    s.lose([0, 7, 0], untracked=2)
    path = s.end()
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    index_path = str(tmp_path / "index.sqlite")
    index.Index(index_path, DataDir(str(data))).refresh()
    app = create_app(DataDir(str(data)), index_path, TOKEN)
    html = app.test_client().get("/session/lossy", headers={"Authorization": f"Bearer {TOKEN}"})
    text = html.get_data(as_text=True)
    assert "fails verification: frame 2" in text
    assert "lost records of this session" in text and "7 disk" in text
    assert "2 processes of this session could not be followed" in text
    listing = app.test_client().get("/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert 'class="damaged lossy"' in listing.get_data(as_text=True)


def test_downloads(browser, data):
    raw = browser.get("/session/s1/recording.esr")
    assert raw.headers["Content-Disposition"] == 'attachment; filename="s1.esr"'
    assert raw.data == (data / "sessions" / "s1.esr").read_bytes()
    lines = browser.get("/session/s1/events.jsonl").get_data(as_text=True).splitlines()
    assert [json.loads(x)["event"] for x in lines][:2] == ["session.start", "session.command"]
    cast = browser.get("/session/s1/cast").get_data(as_text=True).splitlines()
    assert json.loads(cast[0]) == {
        "version": 2,
        "width": 80,
        "height": 24,
        "timestamp": 1790000000,
        "title": "<b>mallory</b>@host s1",
    }
    markers = [json.loads(x) for x in cast[1:]]
    assert [(t, kind) for t, kind, _ in markers] == [
        (0.5, "m"),
        (1.0, "m"),
        (3.001, "m"),
        (4.001, "o"),
    ]
    assert markers[2][2] == "/usr/bin/cat /etc/hostname"


def test_bad_requests_are_one_line(browser):
    assert browser.get("/session/..%2f..%2fetc%2fpasswd").status_code == 404
    assert browser.get("/session/nope").status_code == 404
    for url in ("/?sort=nope", "/?page=0", "/?from=yesterday", "/search?q=x&before=z"):
        r = browser.get(url)
        assert r.status_code == 400 and r.data.count(b"\n") == 1, url


def test_a_recording_is_read_as_it_was_when_asked(browser, data):
    path = data / "sessions" / "s1.esr"
    size = path.stat().st_size
    r = browser.get("/session/s1/recording.esr", buffered=False)
    with open(path, "ab") as f:
        f.write(b"x" * 100)
    assert len(r.get_data()) == size == int(r.headers["Content-Length"])
    with pytest.raises(recording.Damage):
        recording.verify(str(path), "s1")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:8470", ("127.0.0.1", 8470)),
        ("[::1]:0", ("::1", 0)),
        ("9000", ("127.0.0.1", 9000)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_listen_addresses(text, expected):
    assert server.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "x", "1.2.3:80", "127.0.0.1:", "127.0.0.1:65536", ":-1"])
def test_listen_refuses_in_one_line(text):
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        server.parse_listen(text)


def test_a_busy_port_is_one_line():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}: "):
            server.listen(f"127.0.0.1:{port}")

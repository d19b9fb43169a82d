"""The web app of `esr ui`: the sessions list, search, a session's page and
its downloads. It only reads: the recordings, and the index server.py keeps.

Every request carries the access token, in a cookie set from the address
`esr ui` prints, or as a bearer token; any other gets 401. Pages load no
inline script and no third-party resource, and every recorded string goes
through Jinja's escaping (schema.printable escapes control characters
before that, so recorded escape sequences show as text).
"""

from __future__ import annotations

import calendar
import hmac
import os
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlencode

from flask import Flask, Response, abort, redirect, render_template, request
from markupsafe import Markup, escape

from esr import index, schema, show, terminal, tree
from esr.datadir import SID_PATTERN, DataDir
from esr.errors import RecordingError
from esr.ui import session as session_page

HERE = os.path.dirname(os.path.abspath(__file__))
# `make player` puts it there from npm; `make build` alone does not.
PLAYER = os.path.join(HERE, "static", "player", "asciinema-player.min.js")
COOKIE = "esr_ui_token"
PAGE = 50

# The player compiles its terminal emulator from WebAssembly: 'wasm-unsafe-eval'
# allows that and nothing else (no eval of JavaScript). It sets styles through
# the CSSOM, which style-src does not restrict, so no inline style is allowed.
CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def utc(ns: int | None) -> str:
    if ns is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 10**9))


def duration(ns: int | None) -> str:
    if ns is None or ns < 0:
        return "-"
    seconds = ns // 10**9
    if seconds < 60:
        return f"{ns / 1e9:.1f} s"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def marked(snippet: str) -> Markup:
    """A search snippet with its matches in <mark>: everything else escaped.
    The markers are control characters, which indexed text never holds."""
    out = []
    for i, part in enumerate(snippet.replace("\x03", "\x02").split("\x02")):
        out.append(Markup(f"<mark>{escape(part)}</mark>") if i % 2 else escape(part))
    return Markup("").join(out)


def _instant(text: str, name: str) -> int | None:
    """A datetime-local field, taken as UTC, in ns; 400 when unreadable."""
    if not text:
        return None
    for layout in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return calendar.timegm(time.strptime(text, layout)) * 10**9
        except ValueError:
            continue
    abort(400, f"{name}: not a date and time: {text!r}")


def create_app(
    datadir: DataDir, index_path: str, token: str, progress: Callable[[], str] = lambda: ""
) -> Flask:
    """progress says what the indexer is doing, for a banner."""
    app = Flask(
        __name__,
        root_path=HERE,
        static_folder=os.path.join(HERE, "static"),
        template_folder=os.path.join(HERE, "templates"),
    )
    app.jinja_env.trim_blocks = app.jinja_env.lstrip_blocks = True
    app.jinja_env.filters.update(utc=utc, duration=duration, marked=marked)
    app.jinja_env.globals.update(
        printable=schema.printable,
        error_name=tree.error_name,
        by_buffer=schema.by_buffer,
        progress=progress,
    )
    secret = token.encode()
    local = threading.local()

    def db():
        if not hasattr(local, "db"):
            local.db = index.connect(index_path)
        return local.db

    def allowed(given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), secret)

    @app.before_request
    def authorize():
        given = request.args.get("token")
        if given is not None:
            if not allowed(given):
                abort(401)
            # The cookie carries the token from now on; the address bar,
            # history and logs lose it.
            rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
            target = "/" + request.path.lstrip("/") + (f"?{urlencode(rest)}" if rest else "")
            response = redirect(target, 303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            return response
        header = request.headers.get("Authorization", "")
        bearer = header[7:] if header.startswith("Bearer ") else None
        if not (allowed(request.cookies.get(COOKIE)) or allowed(bearer)):
            abort(401)
        return None

    @app.after_request
    def secure(response: Response) -> Response:
        response.headers.update(HEADERS)
        return response

    @app.errorhandler(400)
    @app.errorhandler(401)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(500)
    def error(err):
        text = {
            401: "esr ui needs its access token: open the address `esr ui` printed.",
        }.get(err.code, err.description)
        response = Response(f"{err.code} {err.name}: {text}\n", err.code, mimetype="text/plain")
        if err.code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="esr ui"'
        return response

    @app.get("/")
    def sessions():
        args = request.args
        sort = args.get("sort", "start")
        if sort not in index.SORTS:
            abort(400, f"sort: one of {', '.join(index.SORTS)}")
        descending = args.get("order", "desc") != "asc"
        page = args.get("page", "1")
        if not page.isdigit() or int(page) < 1:
            abort(400, "page: a number from 1")
        filters = {
            k: args.get(k, "").strip() for k in ("user", "from", "to", "command") if args.get(k)
        }
        rows, total = index.sessions(
            db(),
            user=filters.get("user", ""),
            since=_instant(filters.get("from", ""), "from"),
            until=_instant(filters.get("to", ""), "to"),
            command=filters.get("command", ""),
            sort=sort,
            descending=descending,
            offset=(int(page) - 1) * PAGE,
            limit=PAGE,
        )
        return render_template(
            "sessions.html",
            rows=rows,
            total=total,
            page=int(page),
            pages=max(1, -(-total // PAGE)),
            sort=sort,
            descending=descending,
            filters=filters,
            columns=COLUMNS,
        )

    @app.get("/search")
    def search():
        q = request.args.get("q", "").strip()
        before = request.args.get("before", "")
        if before and not before.isdigit():
            abort(400, "before: a result id")
        hits = index.search(db(), q, int(before) if before else None, PAGE + 1) if q else []
        return render_template(
            "search.html",
            q=q,
            hits=hits[:PAGE],
            more=hits[PAGE - 1].id if len(hits) > PAGE else None,
            offset=offset_of,
        )

    @app.get("/session/<sid>")
    def session(sid: str):
        path = _recording(datadir, sid)
        ei = request.args.get("ei", "")
        if ei and not ei.isdigit():
            abort(400, "ei: an event index")
        view = session_page.load(datadir, sid, int(ei) if ei else None)
        return render_template(
            "session.html",
            s=view,
            t=view.tree,
            size=os.path.getsize(path),
            sealed=os.path.isfile(datadir.seal(sid)),
            limits=session_page,
            focus=view.tree.focus,
            player=os.path.exists(PLAYER),
        )

    @app.get("/session/<sid>/cast")
    def cast(sid: str):
        _recording(datadir, sid)
        return _download(
            terminal.asciicast(datadir, sid),
            f"{sid}.cast",
            "application/x-asciicast",
            attach=request.args.get("download") is not None,
        )

    @app.get("/session/<sid>/events.jsonl")
    def events(sid: str):
        _recording(datadir, sid)
        return _download(_json_lines(datadir, sid), f"{sid}.jsonl", "application/jsonl")

    @app.get("/session/<sid>/recording.esr")
    def raw(sid: str):
        path = _recording(datadir, sid)
        # What the file held when asked: a recording still being written
        # grows meanwhile, and Content-Length must hold.
        size = os.path.getsize(path)
        response = _download(_chunks(path, size), f"{sid}.esr", "application/octet-stream")
        response.headers["Content-Length"] = str(size)
        return response

    @app.get("/session/<sid>/recording.seal")
    def seals(sid: str):
        _recording(datadir, sid)
        path = datadir.seal(sid)
        if not os.path.isfile(path):
            abort(404, f"session {sid!r} has no seal file")
        size = os.path.getsize(path)
        response = _download(_chunks(path, size), f"{sid}.seal", "application/octet-stream")
        response.headers["Content-Length"] = str(size)
        return response

    return app


def offset_of(hit: index.Hit) -> str:
    return f"+{(hit.time - hit.start_ns) / 1e9:.3f}s" if hit.start_ns else ""


COLUMNS = [
    ("login", "Login/user"),
    ("remote", "From"),
    ("start", "Start (UTC)"),
    ("duration", "Duration"),
    ("commands", "Commands"),
    ("files", "Opens"),
    ("connections", "Connects"),
    ("lost", "Lost"),
    ("skipped", "Skipped"),
    ("integrity", "Integrity"),
]


def _recording(datadir: DataDir, sid: str) -> str:
    path = datadir.recording(sid)
    if not SID_PATTERN.fullmatch(sid) or not os.path.isfile(path):
        abort(404, f"no session {sid!r}")
    return path


def _download(body, name: str, mimetype: str, attach: bool = True) -> Response:
    response = Response(body, mimetype=mimetype)
    if attach:
        # sid is letters, digits and . _ : - only: nothing to quote.
        response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


def _chunks(path: str, size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while size > 0:
            chunk = f.read(min(size, 1 << 20))
            if not chunk:
                return
            size -= len(chunk)
            yield chunk


def _json_lines(datadir: DataDir, sid: str) -> Iterator[bytes]:
    """The events as `esr show` prints them: the intact part of a damaged
    recording (the page says where the damage is)."""
    try:
        yield from show.lines(datadir, sid, "json", None)
    except RecordingError:
        return

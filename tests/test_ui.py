"""esr ui in a real browser: Debian's Chromium, headless, driven by
Playwright, on a session recorded for real with esr run. Screenshots go to
build/ui-screenshots/."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, Esr, require_bpf

CHROMIUM = "/usr/bin/chromium"
# Without these, a closed network makes Chromium hang on lookups.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = ROOT / "build" / "ui-screenshots"

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(2)>'
LOGIN = "<img src=x onerror=alert(3)>"
# Commands seconds apart, so that the player's own clock (whole seconds)
# tells them apart; echo by its path, so that it is an exec with this argv
# and not bash's builtin.
SESSION = f"""
cd "$1"
uname -r
sleep 2
/usr/bin/echo '{SCRIPT}'
/usr/bin/touch '{IMG}'
/usr/bin/echo $'\\e[31mred\\e[0m'
/usr/bin/touch $'ansi-\\e[31m-file'
sleep 2
cat /etc/hostname
sleep 2
id -u
"""


def snapshot(path: Path) -> dict:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
        for p in [path, *path.rglob("*")]
    }


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A session recorded for real, with XSS and ANSI payloads in its login,
    argv and file names."""
    require_bpf()
    tmp = tmp_path_factory.mktemp("ui")
    esr = Esr(tmp / "data")
    work = tmp / "work"
    work.mkdir()
    r = esr("run", "--login", LOGIN, "--", "bash", "-c", SESSION, "session", str(work))
    sid = next(
        line.split()[3]
        for line in r.stderr.decode().splitlines()
        if line.startswith("esr: recording session ")
    )
    return esr, sid, tmp


@pytest.fixture(scope="module")
def ui(recorded):
    """esr ui on the recorded data dir: its base address and token."""
    esr, _sid, tmp = recorded
    before = snapshot(esr.data_dir)
    proc = esr.popen(
        "ui",
        "--listen",
        "127.0.0.1:0",
        "--index",
        str(tmp / "index.sqlite"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=(\S+)", line)
        assert found, line + proc.stderr.read()
        yield found.group(1), found.group(2)
    finally:
        proc.terminate()
        proc.wait(10)
    # It only read the data dir: nothing in it was created or touched.
    assert snapshot(esr.data_dir) == before


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no {CHROMIUM}: make installs Debian's chromium")
    if not (ROOT / "esr/ui/static/player/asciinema-player.min.js").exists():
        pytest.fail("the player is not installed: run `make player` (make test does)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        # Never a browser Playwright downloads: Debian's, in a fresh profile.
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        yield context
        context.close()


@pytest.fixture
def page(browser, ui):
    """A page of the UI, logged in, that fails the test on any dialog,
    script error or Content-Security-Policy violation."""
    base, token = ui
    page = browser.new_page()
    trouble: list[str] = []
    page.on("dialog", lambda d: (trouble.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("pageerror", lambda e: trouble.append(f"script error: {e}"))
    page.on(
        "console",
        lambda m: trouble.append(f"console: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.goto(f"{base}?token={token}")
    assert page.url == base  # the token went into a cookie and out of the address
    yield page
    page.close()
    assert not trouble, trouble


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def reload_until(page, selector: str, seconds: float = 20) -> None:
    """The indexer reads the recordings in the background, after start."""
    deadline = time.monotonic() + seconds
    while page.locator(selector).count() == 0:
        assert time.monotonic() < deadline, f"no {selector} on {page.url}"
        page.wait_for_timeout(500)
        page.reload()


def clock(page, until, seconds: float = 10) -> float:
    """The player's current time, as the page reads it from the player,
    once until(time) holds. Polled from here: the page's CSP forbids the
    script Playwright's wait_for_function would evaluate in it."""
    deadline = time.monotonic() + seconds
    while True:
        now = float(page.locator("#clock").inner_text().strip("+s"))
        if until(now):
            return now
        assert time.monotonic() < deadline, f"the player's time stayed at {now}"
        page.wait_for_timeout(100)


def test_find_a_session_by_command_open_it_play_it_and_seek(page, recorded):
    _esr, sid, _tmp = recorded
    reload_until(page, f"table.sessions a[href='/session/{sid}']")
    row = page.locator("table.sessions tbody tr", has=page.locator(f"a[href='/session/{sid}']"))
    assert row.locator("td").nth(9).inner_text() == "intact"
    shot(page, "1-sessions")

    page.fill("input[name=q]", "uname")
    page.press("input[name=q]", "Enter")
    hit = page.locator("ol.hits li", has_text="/usr/bin/uname -r")
    assert hit.locator(".kind").inner_text().lower() == "command"
    shot(page, "2-search")
    hit.locator("a.hit").click()

    # The result's moment: the player is there, the command highlighted.
    page.wait_for_selector(".ap-player")
    uname = page.locator("#timeline li", has_text="/usr/bin/uname -r")
    at = float(uname.get_attribute("data-t"))
    clock(page, lambda t: abs(t - at) < 0.01)
    assert "current" in uname.get_attribute("class")

    page.click(".ap-overlay-start .ap-play-button")
    clock(page, lambda t: t > at + 0.5)
    shot(page, "3-playing")

    later = page.locator("#timeline li", has_text="/usr/bin/id -u")
    target = float(later.get_attribute("data-t"))
    assert target > at + 5  # the session slept between them
    later.locator("a.seek").click()
    assert clock(page, lambda t: t >= target - 0.01) < target + 1.5
    # The player's own clock, in its control bar, moved there too.
    elapsed = page.locator(".ap-time-elapsed").inner_text()
    minutes, seconds = map(int, elapsed.split(":"))
    assert int(target) <= minutes * 60 + seconds <= int(target) + 2
    assert "current" in later.get_attribute("class")
    shot(page, "4-seeked")


def test_payloads_render_as_text(page, recorded):
    _esr, sid, _tmp = recorded
    reload_until(page, f"table.sessions a[href='/session/{sid}']")
    assert LOGIN in page.locator("table.sessions").inner_text()
    page.goto(page.url + f"session/{sid}")
    page.wait_for_selector(".ap-player")
    for node in page.locator("li.proc details").all():
        node.evaluate("d => d.open = true")
    text = page.locator("main").inner_text()
    assert SCRIPT in text and IMG in text and LOGIN in text
    assert "\\x1b[31mred\\x1b[0m" in text and "ansi-\\x1b[31m-file" in text
    assert "\x1b" not in text
    # None of it became markup: no image, no script but the page's own.
    assert page.locator("img").count() == 0
    scripts = page.locator("script").evaluate_all("s => s.map(x => x.getAttribute('src'))")
    assert scripts and all(s and s.startswith("/static/") for s in scripts)
    shot(page, "5-payloads")

    page.goto(page.url.split("session/")[0] + "search?q=onerror")
    assert page.locator("ol.hits li").count() >= 2  # the touch command and the file
    assert page.locator("img").count() == 0
    shot(page, "6-payloads-search")


def test_downloads_and_the_raw_recording_verifies(page, recorded, tmp_path):
    esr, sid, _tmp = recorded
    page.goto(page.url + f"session/{sid}")
    with page.expect_download() as download:
        page.click("a[href$='/recording.esr']")
    offline = tmp_path / "offline"
    (offline / "sessions").mkdir(parents=True)
    download.value.save_as(offline / "sessions" / f"{sid}.esr")
    # Without its seals, a sealed recording cannot vouch for its end.
    r = Esr(offline)("verify", sid, check=False)
    assert r.returncode == 1 and b"seal file is missing" in r.stderr
    with page.expect_download() as download:
        page.click("a[href$='/recording.seal']")
    download.value.save_as(offline / "sessions" / f"{sid}.seal")
    r = Esr(offline)("verify", sid)
    assert b"intact" in r.stdout
    with page.expect_download() as download:
        page.click("a[href$='/events.jsonl']")
    lines = Path(download.value.path()).read_text().splitlines()
    assert len(lines) == len(esr("show", sid).stdout.splitlines())


def test_without_the_token_401(ui, recorded):
    base, token = ui
    _esr, sid, _tmp = recorded
    for path in ("", "search?q=uname", f"session/{sid}", f"session/{sid}/recording.esr",
                 f"session/{sid}/recording.seal",
                 "static/session.js", "static/player/asciinema-player.min.js"):  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path)
        assert err.value.code == 401, path
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path + ("&" if "?" in path else "?") + "token=x" + token)
        assert err.value.code == 401, path


def test_bad_listen_and_busy_port_are_one_line(recorded, ui):
    esr, _sid, _tmp = recorded
    port = ui[0].rsplit(":", 1)[1].strip("/")
    for listen, message in (
        ("nowhere", "expected HOST:PORT"),
        (f"127.0.0.1:{port}", f"cannot listen on 127.0.0.1:{port}: Address already in use"),
    ):
        r = esr("ui", "--listen", listen, "--index", "/nonexistent/ix", check=False, timeout=20)
        assert r.returncode != 0 and r.stderr.decode().count("\n") == 1
        assert message in r.stderr.decode()

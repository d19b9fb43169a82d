"""aptsources finds the Debian mirror in apt's own configuration, in either
format, so builds use whatever mirror or proxy the host is set up with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packaging"))
import aptsources

SCRIPT = Path(__file__).resolve().parents[2] / "packaging/aptsources.py"


def etc(tmp_path: Path, codename: str = "bookworm", **files: str) -> Path:
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/os-release").write_text(f'ID=debian\nVERSION_CODENAME="{codename}"\n')
    for name, text in files.items():
        (tmp_path / "etc/apt" / name.replace("__", "/")).write_text(text)
    return tmp_path


def test_deb822_with_comments_inline_key_and_disabled_stanza(tmp_path):
    root = etc(
        tmp_path,
        **{
            "sources.list.d__debian.sources": """\
# a disabled proxy first: apt skips it, so must we
Types: deb
URIs: http://disabled.invalid/debian
Suites: bookworm
Enabled: no

Types: deb deb-src
# comment lines may sit inside a stanza
URIs: http://proxy.invalid:3142/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBGPL
 -----END PGP PUBLIC KEY BLOCK-----
\t
Types: deb
URIs: http://proxy.invalid:3142/debian-security
Suites: bookworm-security
Components: main
""",
            "sources.list.d__other.sources.disabled": "Types: deb\nURIs: http://x.invalid\n"
            "Suites: bookworm-security\n",
        },
    )
    assert aptsources.archive_uri(root) == "http://proxy.invalid:3142/debian"
    assert aptsources.security_uri(root) == "http://proxy.invalid:3142/debian-security"
    assert aptsources.lines("deb-src", "bullseye", root) == [
        "deb-src http://proxy.invalid:3142/debian bullseye main",
        "deb-src http://proxy.invalid:3142/debian-security bullseye-security main",
        "deb-src http://proxy.invalid:3142/debian bullseye-updates main",
    ]


def test_one_line_format_with_options(tmp_path):
    root = etc(
        tmp_path,
        codename="trixie",
        **{
            "sources.list": "# deb http://commented.invalid/debian trixie main\n"
            "deb [ arch=amd64 signed-by=/k.gpg ] https://m.invalid/debian trixie main\n",
            "sources.list.d__sec.list": "deb [arch=amd64] https://m.invalid/debian-security"
            " trixie-security main # trailing comment\n",
            "sources.list.d__vendor.list": "deb https://vendor.invalid/apt stable main\n",
        },
    )
    assert aptsources.archive_uri(root) == "https://m.invalid/debian"
    assert aptsources.security_uri(root) == "https://m.invalid/debian-security"


def test_no_debian_source_is_a_clear_error(tmp_path):
    root = etc(
        tmp_path, **{"sources.list.d__vendor.list": "deb https://vendor.invalid/apt stable main\n"}
    )
    with pytest.raises(aptsources.AptSourcesError, match="no apt source for suite 'bookworm'"):
        aptsources.archive_uri(root)


def test_cli_prints_deb_src_lines_for_this_host():
    r = subprocess.run(
        ["/usr/bin/python3", str(SCRIPT), "deb-src", "bookworm"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    kinds_and_suites = [line.split()[0::2] for line in r.stdout.splitlines()]
    assert kinds_and_suites == [
        ["deb-src", "bookworm"],
        ["deb-src", "bookworm-security"],
        ["deb-src", "bookworm-updates"],
    ]
    bad = subprocess.run(["/usr/bin/python3", str(SCRIPT), "deb"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr

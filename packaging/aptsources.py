"""The Debian archive and security URIs that this machine's apt uses, so a
build fetches from the mirror or proxy configured on the host and no host
name is written into the repository.

    python3 packaging/aptsources.py deb-src bookworm   # sources.list lines
    python3 packaging/aptsources.py mirror              # the archive URI

Stdlib only, for Debian's /usr/bin/python3: the Makefile fetches libbpf's
source with it, the guest harness its Debian releases. Reads
/etc/apt/sources.list and sources.list.d/*.list (one-line format) and
sources.list.d/*.sources (deb822). The archive is the source that lists the
host's own release (VERSION_CODENAME in os-release), the security archive the
one that lists "<codename>-security"; other releases are assumed to live at
the same URIs, as they do on Debian's mirrors.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path


class AptSourcesError(Exception):
    """The host's apt configuration names no usable Debian archive."""


@dataclass(frozen=True)
class Source:
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]


def _one_line(text: str) -> list[Source]:
    sources = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] not in ("deb", "deb-src"):
            continue
        rest = words[1:]
        # Options: "[arch=amd64 signed-by=...]", possibly with spaces inside.
        if rest and rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            sources.append(Source((words[0],), (rest[0],), (rest[1],), tuple(rest[2:])))
    return sources


def _deb822(text: str) -> list[Source]:
    sources = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        name = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and name:  # continuation (e.g. an inline Signed-By key)
                fields[name] += " " + line.strip()
                continue
            name, _, value = line.partition(":")
            name = name.strip().lower()
            fields[name] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if fields.get("types") and fields.get("uris") and fields.get("suites"):
            sources.append(
                Source(
                    *(
                        tuple(fields.get(k, "").split())
                        for k in ("types", "uris", "suites", "components")
                    )
                )
            )
    return sources


def read_sources(root: Path | str = "/") -> list[Source]:
    """Every enabled source in apt's configuration under root, in apt's order."""
    etc = Path(root) / "etc/apt"
    sources = []
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*"))]:
        if path.name.endswith(".list") and path.is_file():
            sources += _one_line(path.read_text(errors="replace"))
        elif path.name.endswith(".sources") and path.is_file():
            sources += _deb822(path.read_text(errors="replace"))
    return sources


def host_codename(root: Path | str = "/") -> str:
    for name in ("etc/os-release", "usr/lib/os-release"):
        try:
            text = (Path(root) / name).read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key == "VERSION_CODENAME" and value.strip("\"'"):
                return value.strip("\"'")
    raise AptSourcesError(f"no VERSION_CODENAME in {root}etc/os-release")


def _uri_for(suite: str, root: Path | str) -> str:
    for source in read_sources(root):
        if suite in source.suites and any(t in ("deb", "deb-src") for t in source.types):
            return source.uris[0].rstrip("/")
    raise AptSourcesError(f"no apt source for suite {suite!r} under {Path(root) / 'etc/apt'}")


def archive_uri(root: Path | str = "/") -> str:
    """The Debian archive apt uses here, e.g. http://<mirror>/debian."""
    return _uri_for(host_codename(root), root)


def security_uri(root: Path | str = "/") -> str:
    """The Debian security archive apt uses here."""
    return _uri_for(host_codename(root) + "-security", root)


def lines(kind: str, release: str, root: Path | str = "/") -> list[str]:
    """sources.list lines ("deb" or "deb-src") for release's main component:
    the release, its security updates and its stable updates."""
    archive, security = archive_uri(root), security_uri(root)
    return [
        f"{kind} {archive} {release} main",
        f"{kind} {security} {release}-security main",
        f"{kind} {archive} {release}-updates main",
    ]


def main(argv: list[str]) -> int:
    usage = (
        "usage: aptsources.py deb|deb-src RELEASE   (sources.list lines)\n"
        "       aptsources.py mirror|security       (the archive URIs)"
    )
    try:
        if len(argv) == 2 and argv[0] in ("deb", "deb-src"):
            print("\n".join(lines(argv[0], argv[1])))
        elif argv == ["mirror"]:
            print(archive_uri())
        elif argv == ["security"]:
            print(security_uri())
        else:
            print(usage, file=sys.stderr)
            return 2
    except (AptSourcesError, OSError) as err:
        print(f"aptsources: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

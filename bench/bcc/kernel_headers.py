"""Which kernel headers bcc compiles the peer against.

The running kernel's (/lib/modules/$(uname -r)/{build,source}, or
BCC_KERNEL_SOURCE as set by the caller, or /sys/kernel/kheaders.tar.xz) when
present; else the nearest installed Debian linux-headers-*. Debian splits
those into an arch tree (generated headers, .config) and a -common tree (the
sources), which bcc 0.26 only combines for /lib/modules/$(uname -r); so
BCC_KERNEL_SOURCE points at the common tree and the arch tree's generated
include directories are added as cflags, in the kernel's own include order.

Stdlib only, like the rest of the peer: it runs under Debian's /usr/bin/python3
(where bcc is), not in esr's venv.
"""

import glob
import os
import platform
import re
import subprocess


class NoKernelHeaders(Exception):
    """No usable kernel headers; the message says why."""


def _version_key(release: str):
    return tuple(int(x) for x in re.findall(r"\d+", release)[:4])


def _release_of(tree: str) -> str:
    try:
        with open(os.path.join(tree, "include/generated/utsrelease.h")) as f:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    return os.path.basename(tree.rstrip("/")).replace("linux-headers-", "")


def _deb_version(release: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "linux-headers-" + release],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _is_source_tree(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "include/linux/kconfig.h"))


def _is_build_tree(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "include/generated/autoconf.h"))


def _common_of(build: str) -> str:
    """The Debian -common source tree that goes with an arch tree."""
    release = _release_of(build)
    candidates = [os.path.join("/lib/modules", release, "source")]
    try:
        with open(os.path.join(build, "Makefile")) as f:
            m = re.search(r"^include\s+(\S+)/Makefile\s*$", f.read(), re.M)
            if m:
                candidates.append(m.group(1))
    except OSError:
        pass
    for c in candidates:
        if _is_source_tree(c):
            return os.path.realpath(c)
    return ""


def _split_tree(build: str, source: str, running: str, why: str):
    """bcc settings for a Debian-style split tree (build = arch, source = common)."""
    arch = (
        "x86"
        if platform.machine() in ("x86_64", "i686", "i386")
        else {"aarch64": "arm64"}.get(platform.machine(), platform.machine())
    )
    cflags = [
        f"-I{build}/arch/{arch}/include/generated",
        f"-I{build}/include",
        f"-I{build}/arch/{arch}/include/generated/uapi",
        f"-I{build}/include/generated/uapi",
    ]
    release = _release_of(build)
    deb = _deb_version(release)
    desc = f"{build} + {source} (Linux {release}{', Debian ' + deb if deb else ''}; {why}"
    if release != running:
        desc += f", not the running kernel {running}"
    desc += ")"
    return {"BCC_KERNEL_SOURCE": source}, cflags, desc


def find_headers(mode: str):
    """(environment, cflags, description) telling bcc which kernel headers
    to compile against; raises NoKernelHeaders when there are none."""
    running = platform.release()
    modules = os.path.join("/lib/modules", running)
    if mode not in ("auto", "running"):
        tree = os.path.realpath(mode)
        if _is_source_tree(tree) and _is_build_tree(tree):
            return (
                {"BCC_KERNEL_SOURCE": tree},
                [],
                f"{tree} (Linux {_release_of(tree)}; --headers)",
            )
        common = _is_build_tree(tree) and _common_of(tree)
        if common:
            return _split_tree(tree, common, running, "--headers")
        raise NoKernelHeaders(
            f"--headers {mode}: not a kernel header tree "
            "(no include/linux/kconfig.h + include/generated/autoconf.h)"
        )

    env_tree = os.environ.get("BCC_KERNEL_SOURCE")
    if env_tree:
        common = not _is_source_tree(env_tree) and _is_build_tree(env_tree) and _common_of(env_tree)
        if common:
            return _split_tree(os.path.realpath(env_tree), common, running, "BCC_KERNEL_SOURCE")
        return {}, [], f"{env_tree} (BCC_KERNEL_SOURCE, Linux {_release_of(env_tree)})"
    build, source = os.path.join(modules, "build"), os.path.join(modules, "source")
    if os.path.isdir(source) and os.path.isdir(build):
        if _is_source_tree(source) and _is_build_tree(build):
            return (
                {},
                [],
                f"{os.path.realpath(build)} + {os.path.realpath(source)} "
                f"(running kernel {running})",
            )
    elif _is_source_tree(build) and _is_build_tree(build):
        return {}, [], f"{os.path.realpath(build)} (running kernel {running})"
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return {}, [], f"/sys/kernel/kheaders.tar.xz (running kernel {running})"
    if mode == "running":
        raise NoKernelHeaders(
            f"no kernel headers for the running kernel {running} "
            f"({modules}/build, /sys/kernel/kheaders.tar.xz)"
        )

    # The nearest installed Debian linux-headers-*: the newest release not
    # newer than the running kernel, else the oldest newer one; the generic
    # flavour before -cloud, -rt.
    trees = []
    for build in glob.glob("/usr/src/linux-headers-*"):
        if not _is_build_tree(build) or not os.path.isfile(os.path.join(build, ".config")):
            continue
        if _is_source_tree(build):
            source = build
        else:
            source = _common_of(build)
            if not source:
                continue
        release = _release_of(build)
        flavour = 0 if re.search(r"\d-(amd64|arm64|686|686-pae)$", release) else 1
        trees.append((_version_key(release), flavour, release, os.path.realpath(build), source))
    if not trees:
        raise NoKernelHeaders(
            f"no kernel headers: none for the running kernel {running} "
            f"({modules}/build, /sys/kernel/kheaders.tar.xz) and no "
            "/usr/src/linux-headers-* installed (apt-get install linux-headers-amd64)"
        )
    mine = _version_key(running)
    older = [t for t in trees if t[0] <= mine]
    if older:
        best = max(older, key=lambda t: (t[0], -t[1]))
    else:
        best = min(trees, key=lambda t: (t[0], t[1]))
    _, _, release, build, source = best
    if build == source:
        return (
            {"BCC_KERNEL_SOURCE": build},
            [],
            f"{build} (Linux {release}, nearest installed; not the running kernel {running})",
        )
    return _split_tree(build, source, running, "nearest installed")

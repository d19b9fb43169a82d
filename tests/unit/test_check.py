"""esr check: its verdict on a kernel that cannot record is one line."""

from __future__ import annotations

import pytest

from esr import check, cli


@pytest.mark.parametrize(
    ("release", "version"),
    [("5.10.0-35-amd64", (5, 10)), ("6.12.48+deb13-amd64", (6, 12)), ("4.19.0", (4, 19))],
)
def test_release_versions(release, version):
    assert check.release_version(release) == version


def test_what_the_kernel_lacks_first_is_said_in_one_line(monkeypatch, capsys):
    def lines(_config):
        yield "kernel: 4.19.0 (esr needs 5.10 or later)", "Linux 4.19.0 is too old"
        yield "BTF: missing (/sys/kernel/btf/vmlinux)", "no BTF (/sys/kernel/btf/vmlinux)"
        yield "perf buffer: yes", None

    monkeypatch.setattr(check, "check", lines)
    assert cli.main(["check", "--config", "/dev/null"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "perf buffer: yes"
    assert err == "esr: cannot record on this kernel: Linux 4.19.0 is too old\n"

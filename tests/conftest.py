"""Fixtures; what tests share besides them is in helpers.py."""

from __future__ import annotations

import pytest

from helpers import Esr, require_bpf


@pytest.fixture
def bpf():
    require_bpf()


@pytest.fixture
def esr(tmp_path) -> Esr:
    return Esr(tmp_path / "data")

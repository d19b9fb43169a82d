"""The session registry: slots, and cookies that are never reused."""

from __future__ import annotations

import pytest

from esr.errors import RegistryFull, SessionError
from esr.registry import Registry


def test_cookies_are_never_reused_even_when_slots_are():
    registry = Registry(2)
    seen = set()
    for _ in range(10):
        slot, cookie = registry.allocate()
        assert cookie & 0xFFFFFFFF == slot and cookie not in seen
        seen.add(cookie)
        registry.release(slot)


def test_a_full_registry_refuses_the_next_session():
    registry = Registry(2)
    registry.allocate()
    registry.allocate()
    with pytest.raises(RegistryFull, match="all 2 session slots") as err:
        registry.allocate()
    assert isinstance(err.value, SessionError)

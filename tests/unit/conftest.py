"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.terminal import Terminal


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    """The Terminals a test opens, closed after it."""
    opened: list[Terminal] = []
    yield opened
    for t in opened:
        t.close()

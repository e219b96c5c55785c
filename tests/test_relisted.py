"""The archive's listings kept fresh in the background: the first list and one asked for after a
store are made on the spot; an old one is answered at once while one thread lists again; an
archive that does not answer leaves the last list standing."""

from __future__ import annotations

import threading
import time

import pytest

from lib.archive.relisted import Relisted
from server import until


class Archive:
    def __init__(self) -> None:
        self.series = ["a"]
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.down = False

    def list_all(self) -> list[str]:
        self.calls += 1
        self.gate.wait(10)
        if self.down:
            raise ConnectionError("refused")
        return list(self.series)


def test_an_old_list_is_answered_at_once_while_one_thread_lists_again():
    archive = Archive()
    listed = Relisted(archive.list_all, refresh_seconds=0.05, what="series")
    assert listed() == ["a"] and archive.calls == 1  # the first list: on the spot
    archive.series.append("b")
    archive.gate.clear()  # the archive is slow to answer now
    time.sleep(0.06)
    t0 = time.perf_counter()
    answers = [listed() for _ in range(5)]
    assert time.perf_counter() - t0 < 0.5 and answers == [["a"]] * 5  # nobody waits for the slow listing
    assert archive.calls == 2  # one background listing, not one per question
    archive.gate.set()
    until(lambda: listed() == ["a", "b"])


def test_the_archive_down_leaves_the_last_list_and_the_first_list_fails_loudly():
    archive = Archive()
    archive.down = True
    listed = Relisted(archive.list_all, refresh_seconds=0.01, what="series")
    with pytest.raises(ConnectionError):
        listed()
    archive.down = False
    assert listed() == ["a"]  # the archive came up: listed on the spot
    archive.down = True
    time.sleep(0.02)
    assert listed() == ["a"]
    until(lambda: archive.calls >= 3)
    assert listed() == ["a"]


def test_invalidate_lists_on_the_spot():
    archive = Archive()
    listed = Relisted(archive.list_all, refresh_seconds=3600, what="SEG series")
    assert listed() == ["a"]
    archive.series.append("b")
    assert listed() == ["a"]  # fresh enough: not listed again
    listed.invalidate()
    assert listed() == ["a", "b"]


def test_after_the_first_list_only_what_changed_is_asked_for():
    archive = Archive()
    updates: list[list[str]] = []

    def update(last: list[str]) -> list[str]:
        updates.append(last)
        if archive.down:
            raise ConnectionError("refused")
        return last + ["new"]

    listed = Relisted(archive.list_all, refresh_seconds=3600, what="series", update=update)
    assert listed() == ["a"]
    listed.invalidate()  # this server stored something: brought up to date on the spot
    assert listed() == ["a", "new"] and updates == [["a"]] and archive.calls == 1
    archive.down = True
    listed.invalidate()
    with pytest.raises(ConnectionError):
        listed()
    archive.down = False
    assert listed() == ["a", "new", "new"]  # still stale after the failure: asked again
    assert archive.calls == 1  # never listed in full again

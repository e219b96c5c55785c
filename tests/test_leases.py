"""Leases and provenance on their own (no server): a fake clock, MONAI Label's strategies."""

from __future__ import annotations

import threading

import numpy as np
from monailabel.tasks.activelearning.first import First

from lib.team.leases import Leases
from lib.team.provenance import AUTOMATIC, MANUAL, SEMIAUTOMATIC, Provenance
from lib.team.store import open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Images:
    """The part of a datastore a strategy reads."""

    def __init__(self, unlabelled: list[str]) -> None:
        self.unlabelled = unlabelled

    def get_unlabeled_images(self, label_tag=None, labels=None) -> list[str]:
        return list(self.unlabelled)


def test_leases_follow_the_rule(team_db):
    clock = Clock()
    leases = Leases(open_store(team_db), minutes=30, clock=clock)
    images = Images(["a", "b"])
    first = First()
    got = {c: leases.next_image(c, first, {}, images) for c in ("x", "y")}
    assert (got["x"][0]["id"], got["y"][0]["id"]) == ("a", "b") and got["x"][1] is None
    shared, note = leases.next_image("z", first, {}, images)  # nothing free: shared, with a note
    assert shared["id"] == "a" and "x (until" in note
    again, note = leases.next_image("x", first, {}, images)  # x asks again: a is x's and z's, b is y's
    assert again["id"] == "a" and "z (until" in note
    leases.end("a")
    leases.grant("a", "x")
    alone, note = leases.next_image("x", first, {}, images)  # b is y's: x keeps the one it holds
    assert alone["id"] == "a" and note is None
    clock.now += 31 * 60
    assert leases.active() == []
    assert leases.next_image("y", first, {}, Images([]))[0] is None  # nothing left
    leases.grant("b", "y")
    assert leases.end("b") == 1 and leases.held_by("y") is None


def test_one_pick_at_a_time(team_db):
    leases = Leases(open_store(team_db), minutes=30)
    images = Images([f"img{n}" for n in range(8)])
    picks: list[str] = []

    def pick(n: int) -> None:
        picks.append(leases.next_image(f"c{n}", First(), {}, images)[0]["id"])

    threads = [threading.Thread(target=pick, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(picks) == sorted(images.unlabelled)  # eight clients, eight different images


def test_provenance_tells_the_three_kinds_apart(team_db):
    provenance = Provenance(open_store(team_db), per_image=2)
    served = np.zeros((20, 16, 8), np.uint8)
    served[2:10, 3:9, 1:5] = 7
    rid = provenance.record("img", "ada", "v1", "segvol", [{"value": 7, "text": "liver"}], served, {7: "liver"}, 0.5)
    assert provenance.origin("img", 7, served).type == AUTOMATIC
    edited = served.copy()
    edited[15:17, 0:3, 0] = 7  # 6 added
    edited[2, 3, 1] = 0  # 1 removed
    origin = provenance.origin("img", 7, edited)
    assert (origin.type, origin.added, origin.removed, origin.result) == (SEMIAUTOMATIC, 6, 1, rid)
    assert origin.prompts == [{"value": 7, "text": "liver"}] and origin.model_version == "v1"
    assert provenance.origin("img", 3, edited).type == MANUAL
    assert provenance.origin("other", 7, served).type == MANUAL
    for _ in range(2):  # the oldest result of an image goes once per_image newer ones exist
        provenance.record("img", "ada", "v2", "segvol", [], np.zeros_like(served), {7: "liver"}, 0.1)
    assert provenance.origin("img", 7, served).type == SEMIAUTOMATIC
    assert provenance.last_result(client="ada")["model_version"] == "v2"

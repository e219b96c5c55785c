"""Leases: an image handed to one annotator is not handed to another for a while.

A client (an OHIF page, a Slicer session, a script: its ``client_id``; the user name when
authentication is on) holds at most one lease. Asking for the next image gives up the previous
lease and skips that image; saving a final label ends every lease on the image; a lease runs out
after ``lease_minutes``. Only when every unlabelled image is leased to someone else is an image
handed out anyway, shared, with a note that names who else holds it. The same rule wraps every
strategy (ours and MONAI Label's random / first): they see a datastore without the leased images.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lib.team.store import TeamStore, held


@dataclass(frozen=True)
class Lease:
    image: str
    client: str
    granted: float
    until: float

    def as_json(self, now: float) -> dict:
        return {
            "image": self.image,
            "client": self.client,
            "until": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.until)),
            "seconds_left": max(0, round(self.until - now)),
        }


class Leases:
    def __init__(self, store: TeamStore, minutes: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.minutes = minutes
        self.clock = clock
        self._pick_lock = store.lock("pick")  # across processes and hosts
        self._pick_thread_lock = threading.Lock()  # across this process's request threads

    def active(self) -> list[Lease]:
        with self.store.connect() as db:
            rows = db.execute("SELECT * FROM leases WHERE until > ? ORDER BY granted", (self.clock(),)).fetchall()
        return [Lease(r["image"], r["client"], r["granted"], r["until"]) for r in rows]

    def held_by(self, client: str, active: list[Lease] | None = None) -> Lease | None:
        """``client``'s lease, among ``active`` where the caller has just read them."""
        return next((lease for lease in (self.active() if active is None else active) if lease.client == client), None)

    def of_others(self, client: str, active: list[Lease] | None = None) -> dict[str, list[Lease]]:
        """Image -> the unexpired leases other clients hold on it."""
        out: dict[str, list[Lease]] = {}
        for lease in self.active() if active is None else active:
            if lease.client != client:
                out.setdefault(lease.image, []).append(lease)
        return out

    def grant(self, image: str, client: str) -> Lease:
        """``client`` now holds ``image`` (and nothing else) for ``minutes``."""
        now = self.clock()
        lease = Lease(image, client, now, now + self.minutes * 60)
        with self.store.connect(write=True) as db:
            db.execute("DELETE FROM leases WHERE client = ? OR until <= ?", (client, now))
            db.execute("INSERT INTO leases VALUES (?, ?, ?, ?)", (image, client, lease.granted, lease.until))
        return lease

    def end(self, image: str) -> int:
        """A final label was saved: nobody holds the image any more. Returns the leases ended."""
        with self.store.connect(write=True) as db:
            return db.execute("DELETE FROM leases WHERE image = ?", (image,)).rowcount

    def next_image(
        self,
        client: str,
        strategy: Callable,
        request: dict,
        datastore,
        readable: Callable[[str], bool] = lambda image: True,
        seats: Callable[[str, str], int] = lambda image, client: 1,
    ) -> tuple[dict | None, str | None]:
        """The strategy's pick for ``client`` among the images nobody else holds (and not the one
        ``client`` held: asking again means the next one), leased to ``client``, and that can be
        read (checked after the pick lock is released; an unreadable pick is given back and the
        strategy asked again, up to ``MAX_TRIES`` times). Returns the strategy's result (None:
        nothing left to annotate) and a note when the image is shared. ``seats(image, client)``: how
        many other annotators may hold an image before it is taken (2 for a double reading).

        A strategy's ``prepare(request, datastore)``, where it has one (scoring images with the
        model), runs before the pick lock is taken: the lock that every annotator's Next image
        waits on is held for the choice and the grant only."""
        bad: set[str] = set()
        for _ in range(MAX_TRIES):
            candidates = WithoutImages(datastore, bad)
            prepare = getattr(strategy, "prepare", None)
            if prepare is not None:
                prepare(request, candidates)
            result, note = self._pick(client, strategy, request, candidates, seats)
            if result is None or readable(result["id"]):
                return result, note
            bad.add(result["id"])
            self.give_back(result["id"], client)
        return None, None

    def give_back(self, image: str, client: str) -> None:
        with self.store.connect(write=True) as db:
            db.execute("DELETE FROM leases WHERE image = ? AND client = ?", (image, client))

    def _pick(self, client: str, strategy: Callable, request: dict, datastore, seats) -> tuple[dict | None, str | None]:
        with self.picking():
            active = self.active()  # one read of the leases for the whole choice
            taken = {i: held for i, held in self.of_others(client, active).items() if len(held) >= seats(i, client)}
            mine = self.held_by(client, active)
            note = None
            result = strategy(request, WithoutImages(datastore, set(taken) | ({mine.image} if mine else set())))
            if not _picked(result) and mine:  # the image this client holds is the only one left to it
                result = strategy(request, WithoutImages(datastore, set(taken)))
            if not _picked(result) and taken:
                result = strategy(request, datastore)
                if _picked(result):
                    holders = ", ".join(
                        f"{lease.client} (until {time.strftime('%H:%M', time.localtime(lease.until))})"
                        for lease in taken.get(result["id"], [])
                    )
                    note = (
                        "every unlabelled image is leased to another annotator; "
                        f"this one is shared with {holders or 'nobody now'}"
                    )
            if not _picked(result):
                return None, None
            lease = self.grant(result["id"], client)
        return dict(result, lease=lease.as_json(self.clock())), note

    @contextmanager
    def picking(self) -> Iterator[None]:
        """One pick at a time across every process on this store (choose, then grant)."""
        with self._pick_thread_lock, held(self._pick_lock):
            yield


MAX_TRIES = 8  # unreadable picks in a row before Next image gives up


class WithoutImages:
    """A datastore as a strategy sees it: the same, minus ``skip`` among the unlabelled images."""

    def __init__(self, datastore, skip: set[str]) -> None:
        self._inner = datastore
        self._skip = skip

    def get_unlabeled_images(self, *args, **kwargs) -> list[str]:
        return [i for i in self._inner.get_unlabeled_images(*args, **kwargs) if i not in self._skip]

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class WithImages(WithoutImages):
    """A datastore as a strategy sees it: the same, plus ``extra`` among the unlabelled images (a
    double-read image whose first reading is in, still to be read by someone else)."""

    def __init__(self, datastore, extra: set[str]) -> None:
        super().__init__(datastore, set())
        self._extra = extra

    def get_unlabeled_images(self, *args, **kwargs) -> list[str]:
        listed = self._inner.get_unlabeled_images(*args, **kwargs)
        return listed + sorted(self._extra - set(listed))


def _picked(result: dict | None) -> bool:
    return bool(result and result.get("id"))

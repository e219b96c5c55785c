#!/usr/bin/env python3
"""The team store on SQLite and on PostgreSQL: lease throughput and the team's part of a save.

  python scripts/bench_team_db.py [--images 2000] [--hosts 2] [--threads 4] [--saves 200]

For each engine (an SQLite file; a throw-away PostgreSQL started by scripts/postgres.py on a
private port), ``--hosts`` processes, each with its own store object and ``--threads`` threads,
stand for the replicas of several hosts:
- Next image: each thread asks for the next image in a loop (Leases.next_image with a strategy
  that takes the first of ``--images`` unlabelled images nobody holds), for ``--seconds``; picks a
  second over all, and whether any image was handed to two clients at once;
- a save: a served result recorded (what inference writes), then the save's team work (the claim
  against a colleague's newer label, each segment's origin against the served results, the history
  entry, the review, the lease ended), one save at a time and with every thread saving at once.
Prints a table. The model and the archive are left out: this is what the database adds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "apps" / "segvol"), str(ROOT / "scripts")]
import postgres  # noqa: E402
from lib.team.team import Team  # noqa: E402

SHAPE = (64, 64, 32)


class Images:
    """A datastore as a strategy sees it: ``count`` unlabelled images."""

    def __init__(self, count: int) -> None:
        self.ids = [f"img{n:05d}" for n in range(count)]

    def get_unlabeled_images(self, *args, **kwargs) -> list[str]:
        return self.ids


def first(request: dict, datastore) -> dict | None:
    images = datastore.get_unlabeled_images()
    return {"id": images[0]} if images else None


def _team(where: str) -> Team:
    team = Team(lease_minutes=30)
    team.open(where)
    return team


def together(annotator, threads: int) -> None:
    """``annotator(n)`` in ``threads`` threads at once, until each is done."""
    workers = [threading.Thread(target=annotator, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def lease_worker(where: str, host: int, threads: int, images: int, seconds: float, out) -> None:
    """One host: ``threads`` annotators asking for the next image until the time is up."""
    team, datastore = _team(where), Images(images)
    picks: list[str] = []
    lock = threading.Lock()
    start = time.time()

    def annotator(n: int) -> None:
        client = f"h{host}a{n}"
        while time.time() - start < seconds:
            result, _ = team.leases.next_image(client, first, {}, datastore)
            with lock:
                picks.append(result["id"])

    together(annotator, threads)
    out.put(picks)


def save_worker(where: str, host: int, threads: int, saves: int, out) -> None:
    """One host: each thread serves a result and saves it unedited, ``saves`` times; the seconds
    each save's team work took."""
    team = _team(where)
    label = np.zeros(SHAPE, np.uint8)
    label[10:40, 12:50, 4:20] = 1
    seconds: list[float] = []
    lock = threading.Lock()

    def annotator(n: int) -> None:
        client = f"h{host}s{n}"
        for k in range(saves):
            image = f"{client}-{k}"
            team.provenance.record(image, client, "base", "segvol", [{"text": "liver"}], label, {1: "liver"}, 0.1)
            t0 = time.perf_counter()
            with team.final_saves.guard(image, client, None, False):
                origin = team.provenance.origin(image, 1, label)
                info = {
                    "client": client,
                    "model_version": "base",
                    "segments": [dict(value=1, name="liver", **origin.as_json())],
                }
                team.saved(image, "final", info, label)
            with lock:
                seconds.append(time.perf_counter() - t0)
            assert origin.type == "AUTOMATIC", origin

    together(annotator, threads)
    out.put(seconds)


def run(target, where: str, hosts: int, *args) -> list:
    ctx = mp.get_context("spawn")  # no lock or connection of this process inherited by a fork
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(where, h, *args, out)) for h in range(hosts)]
    for p in procs:
        p.start()
    got = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return [x for part in got for x in part]


def watch(where: str, stop: threading.Event) -> list[int]:
    """While annotators pick: how many images have two unexpired leases, asked every 10 ms (one
    statement, one consistent view of the leases table, on either engine)."""
    team = _team(where)
    seen = []
    while not stop.is_set():
        with team.store.connect() as db:
            rows = db.execute(
                "SELECT image FROM leases WHERE until > ? GROUP BY image HAVING COUNT(*) > 1", (time.time(),)
            ).fetchall()
        seen.append(len(rows))
        time.sleep(0.01)
    return seen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def measure(engine: str, where: str, a: argparse.Namespace) -> list[str]:
    _team(where)  # the schema, once, before the clock starts
    stop = threading.Event()
    seen: list[int] = []
    checker = threading.Thread(target=lambda: seen.extend(watch(where, stop)))
    checker.start()
    picks = run(lease_worker, where, a.hosts, a.threads, a.images, a.seconds)
    stop.set()
    checker.join()
    one = run(save_worker, where, 1, 1, a.saves)
    many = run(save_worker, where, a.hosts, a.threads, max(1, a.saves // (a.hosts * a.threads)))
    ms = [1000 * s for s in one]
    ms_many = [1000 * s for s in many]
    held_by_two = f"{max(seen, default=0)} of {len(seen)} looks"
    saves = f"{pct(ms, 50):.1f} / {pct(ms, 95):.1f} | {pct(ms_many, 50):.1f} / {pct(ms_many, 95):.1f}"
    return [f"| {engine} | {len(picks) / a.seconds:.0f} | {held_by_two} | {saves} |"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="unlabelled images (2000)")
    ap.add_argument("--hosts", type=int, default=2, help="processes, each its own store object (2)")
    ap.add_argument("--threads", type=int, default=4, help="annotators per process (4)")
    ap.add_argument("--seconds", type=float, default=10, help="how long annotators ask for the next image (10)")
    ap.add_argument(
        "--saves", type=int, default=200, help="saves one at a time; as many again shared by all threads (200)"
    )
    a = ap.parse_args(argv)
    rows = [
        f"{a.hosts} processes x {a.threads} threads, {a.images} unlabelled images",
        "",
        "| team store | next image / s | images held by two (most at one look) "
        "| save p50 / p95 ms, one at a time | save p50 / p95 ms, all at once |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="segvol-bench-") as tmp:
        rows += measure("SQLite (WAL)", str(Path(tmp) / "team.sqlite"), a)
    folder = Path(tempfile.mkdtemp(prefix="segvol-pg-", dir="/tmp"))  # reachable by the postgres user
    try:
        rows += measure("PostgreSQL (loopback)", postgres.start(folder, free_port()), a)
    finally:
        postgres.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""segvol-label against an archive at hospital scale: a private Orthanc filled with small
synthetic CT series and SEGs, one server on it, and a table of what an annotator feels.

  python scripts/bench_archive.py [--series 10000] [--segs 2000] [--annotators 8] [--seconds 30]
                                  [--refresh 60] [--new 50] [--full-size]

Measured, in this order: filling Orthanc (instances/s); the server's start-up to ready and its
memory (RSS) then and after the first full listing; /info and /datastore latency (p50, p95 of
20 calls); Next image p50 / p95 while a client prompts (text prompts on random images), first
with ``--annotators`` threads asking at the same moment once a second, then with each asking
again as soon as answered (a stress test: there latency is set by throughput); the background
scorer's rate on these small series; what a full listing and a refresh (nothing new; ``--new``
new series) cost; how long until ``--new`` series added to the archive are listed, and the
server's CPU seconds per minute while scoring and refreshing. ``--full-size``: one full-size
ViT-B scoring pass on a realistic CT on this machine, and the time every image would then need.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from synthetic_series import ct_series, seg_of  # noqa: E402

import orthanc  # noqa: E402
from replicas import server_command, wait_healthy  # noqa: E402


def fill(port: int, start: int, count: int, segs: int, workers: int = 8) -> tuple[list[str], float, int]:
    """``count`` series (and a SEG for the first ``segs``) into Orthanc: their series UIDs, seconds, instances."""
    session = requests.Session()

    def one(n: int) -> tuple[str, int]:
        study, series, files = ct_series(n)
        if n - start < segs:
            files.append(seg_of(study, series, n))
        for f in files:
            session.post(f"http://127.0.0.1:{port}/instances", data=f, timeout=60).raise_for_status()
        return series, len(files)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(one, range(start, start + count)))
    return [s for s, _ in done], time.perf_counter() - t0, sum(k for _, k in done)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(call, times: int) -> list[float]:
    out = []
    for _ in range(times):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def rss_mb(proc: psutil.Process) -> float:
    return sum(x.memory_info().rss for x in [proc, *proc.children(recursive=True)]) / 2**20


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--segs", type=int, default=2_000)
    ap.add_argument("--annotators", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--refresh", type=float, default=60, help="--conf archive_refresh_seconds")
    ap.add_argument("--new", type=int, default=50, help="series added while the server runs")
    ap.add_argument("--full-size", action="store_true", help="time a full-size scoring pass too")
    a = ap.parse_args(argv)
    rows: list[tuple[str, str]] = []

    def row(what: str, value: str) -> None:
        rows.append((what, value))
        print(f"{what:<58} {value}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="segvol-bench-archive-"))
    port = free_port()
    orthanc.start(port, work / "orthanc")
    server = None
    try:
        ids, seconds, instances = fill(port, 0, a.series, a.segs)
        row(
            f"fill Orthanc: {a.series} series, {a.segs} SEGs",
            f"{seconds:.0f} s ({instances / seconds:.0f} instances/s)",
        )

        sport = free_port()
        url = f"http://127.0.0.1:{sport}"
        conf = {
            "weights": "seeded",
            "model_config": "segvol-tiny",
            "archive_refresh_seconds": str(a.refresh),
            "versions_dir": str(work / "versions"),
        }
        args = server_command(
            f"http://127.0.0.1:{port}/dicom-web", sport, [x for k, v in conf.items() for x in ("--conf", k, v)]
        )
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'apps' / 'segvol'}:{ROOT}", HF_HUB_OFFLINE="1")
        env["MONAI_LABEL_TRACKING_ENABLED"] = "false"
        log = work / "server.log"
        t0 = time.perf_counter()
        server = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=work)  # noqa: SIM115
        wait_healthy(url, server, "the server", log, timeout=1800)
        row("server start-up to ready", f"{time.perf_counter() - t0:.1f} s")
        proc = psutil.Process(server.pid)
        row("server memory when ready (RSS, with its children)", f"{rss_mb(proc):.0f} MB")

        get = lambda path, **q: requests.get(f"{url}{path}", params=q, timeout=600)  # noqa: E731
        first = timed(lambda: get("/datastore/", output="stats").raise_for_status(), 1)[0]
        row("first /datastore/?output=stats (lists every series and SEG)", f"{first:.2f} s")
        row("server memory after the first listing", f"{rss_mb(proc):.0f} MB")
        info = timed(lambda: get("/info/").raise_for_status(), 20)
        row("/info p50 / p95", f"{p(info, 50) * 1000:.0f} / {p(info, 95) * 1000:.0f} ms")
        stats = timed(lambda: get("/datastore/", output="stats").raise_for_status(), 20)
        row("/datastore/?output=stats p50 / p95", f"{p(stats, 50) * 1000:.0f} / {p(stats, 95) * 1000:.0f} ms")
        whole = timed(lambda: get("/datastore/", output="all").raise_for_status(), 3)
        row("/datastore/?output=all p50 (3 calls)", f"{p(whole, 50):.2f} s")

        stop = threading.Event()
        latencies: list[float] = []
        prompts: list[float] = []
        failures: list[str] = []

        def ask(n: int) -> float:
            t = time.perf_counter()
            r = requests.post(f"{url}/activelearning/uncertainty", json={"client_id": f"ann{n}"}, timeout=120)
            if r.status_code != 200:
                failures.append(f"next {r.status_code}")
            return time.perf_counter() - t

        def annotator(n: int) -> None:
            while not stop.is_set():
                latencies.append(ask(n))

        def prompter() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                r = requests.post(
                    f"{url}/infer/segvol",
                    params={"image": random.choice(ids), "output": "json"},
                    files={"params": (None, '{"label_prompt": [1], "client_id": "prompter"}')},
                    timeout=600,
                )
                prompts.append(time.perf_counter() - t)
                if r.status_code != 200:
                    failures.append(f"prompt {r.status_code}")

        prompting = threading.Thread(target=prompter)
        prompting.start()
        bursts: list[float] = []
        deadline = time.perf_counter() + a.seconds
        with ThreadPoolExecutor(a.annotators) as pool:
            while time.perf_counter() < deadline:  # every annotator clicks Next image at the same moment
                bursts += pool.map(ask, range(a.annotators))
                time.sleep(1)
        row(
            f"Next image p50 / p95, {a.annotators} annotators asking at the same moment, every second, "
            "while prompts run",
            f"{p(bursts, 50) * 1000:.0f} / {p(bursts, 95) * 1000:.0f} ms ({len(bursts)} answers)",
        )
        threads = [threading.Thread(target=annotator, args=(n,)) for n in range(a.annotators)]
        for t in threads:
            t.start()
        time.sleep(a.seconds)
        stop.set()
        for t in threads + [prompting]:
            t.join()
        row(
            f"Next image p50 / p95, {a.annotators} annotators asking again as soon as answered (stress), "
            "while prompts run",
            f"{p(latencies, 50) * 1000:.0f} / {p(latencies, 95) * 1000:.0f} ms ({len(latencies)} answers)",
        )
        row("prompts meanwhile: p50 / p95", f"{p(prompts, 50):.2f} / {p(prompts, 95):.2f} s ({len(prompts)})")
        if failures:
            row("failures", ", ".join(sorted(set(failures))))

        scoring = get("/segvol/status", client_id="bench").json()["scoring"]
        c0, t0 = cpu_s(proc), time.perf_counter()
        time.sleep(10)
        s1 = get("/segvol/status", client_id="bench").json()["scoring"]
        rate = (s1["passes"] - scoring["passes"]) / (time.perf_counter() - t0) * 60
        row(
            "background scorer on these series (tiny model)",
            f"{rate:.0f} images/min, {s1['scored']} of {s1['unlabelled']} so far",
        )

        listing = ArchiveListing(port)
        row("a full listing (paged QIDO: every CT series and every SEG)", f"{listing.full:.2f} s")
        idle = listing.update()
        row("a refresh with nothing new (Orthanc: its series ids)", f"{idle * 1000:.0f} ms")
        before = get("/datastore/", output="stats").json()["total"]
        fill(port, a.series, a.new, 0)
        added = listing.update()
        row(f"a refresh finding {a.new} new series (each looked up)", f"{added * 1000:.0f} ms")
        row(
            f"refresh cost at archive_refresh_seconds {a.refresh:.0f}, {a.new} new series a minute",
            f"{idle * (60 / a.refresh - 1) + added:.2f} s per minute",
        )
        t0 = time.perf_counter()
        while get("/datastore/", output="stats").json()["total"] < before + a.new:
            time.sleep(0.5)
        row(f"{a.new} new series listed after (refresh every {a.refresh:.0f} s)", f"{time.perf_counter() - t0:.0f} s")
        row(
            "server CPU while scoring and refreshing",
            f"{(cpu_s(proc) - c0) / (time.perf_counter() - t0 + 10) * 60:.0f} s per minute",
        )
        if a.full_size:
            row("full-size scoring pass (one 512x512x100 CT, this CPU)", full_size_pass(a.series))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        orthanc.stop(work / "orthanc")
    print("\n| measured | value |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    return 0


class ArchiveListing:
    """The server's listing of the archive, by itself: what a full listing and a refresh cost."""

    def __init__(self, port: int) -> None:
        sys.path.insert(0, str(ROOT / "apps" / "segvol"))
        from dicomweb_client.api import DICOMwebClient

        from lib.archive.listing import ArchiveListing as Listing

        self.listing = Listing(DICOMwebClient(f"http://127.0.0.1:{port}/dicom-web"), {"Modality": "CT"}, 3600)
        self.full = timed(self.listing.images, 1)[0]

    def update(self) -> float:
        """Seconds to bring the listing up to date (incremental on Orthanc)."""

        def refresh() -> None:
            self.listing.invalidate()
            self.listing.images()

        return timed(refresh, 1)[0]


def full_size_pass(images: int) -> str:
    """One zoom-out scoring pass of the full-size model on a realistic CT, and ``images`` of them."""
    sys.path.insert(0, str(ROOT / "apps" / "segvol"))
    from lib.activelearning.scorer import mean_entropy
    from segvol.bench import build_model, synthetic_ct
    from segvol.engine import SegVolPredictor

    predictor = SegVolPredictor(build_model(None, "segvol-official")[0])
    ct = synthetic_ct((512, 512, 100))
    t0 = time.perf_counter()
    logits = predictor.zoom_out_logits(ct, ["liver", "spleen", "right kidney"])
    [mean_entropy(x) for x in logits]
    one = time.perf_counter() - t0
    return f"{one:.1f} s an image: {images} images in {one * images / 3600:.1f} h"


if __name__ == "__main__":
    sys.exit(main())

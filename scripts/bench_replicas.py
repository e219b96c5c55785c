#!/usr/bin/env python3
"""Requests per second of segvol-label with 1, 2, ... replicas behind HAProxy (scripts/replicas.py).

  python scripts/bench_replicas.py [--replicas 1 2] [--clients 4] [--images 6] [--seconds 30]
                                   [--model-config segvol-tiny] [--zoom-in]

A throw-away Orthanc holds ``--images`` synthetic CTs; each image is prompted once first (its
encoding computed on the replica that owns it), then ``--clients`` threads send text prompts on
random images for ``--seconds``: what annotators prompting already-open images cost. Prints a
table (requests/s, median and 95th-percentile latency, the mean first prompt of an image, which
encodes it: what a prompt routed to another replica would cost, failures) per replica count.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import orthanc  # noqa: E402
from replicas import Cluster  # noqa: E402
from segvol.bench import synthetic_ct  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _infer(url: str, image: str, client: str) -> requests.Response:
    return requests.post(
        f"{url}/infer/segvol",
        params={"image": image, "output": "json"},
        files={"params": (None, json.dumps({"label_prompt": [1], "client_id": client}))},
        timeout=600,
    )


def measure(cluster: Cluster, images: list[str], clients: int, seconds: float) -> dict:
    first = []
    for image in images:  # every image encoded once, on its replica: what a prompt elsewhere would cost
        t0 = time.perf_counter()
        _infer(cluster.url, image, "warm-up").raise_for_status()
        first.append(time.perf_counter() - t0)
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(n: int) -> None:
        rng = random.Random(n)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            r = _infer(cluster.url, rng.choice(images), f"bench{n}")
            with lock:
                (latencies.append(time.perf_counter() - t0) if r.ok else failures.append(r.status_code))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "requests/s": len(latencies) / wall,
        "median s": float(np.median(latencies)) if latencies else float("nan"),
        "p95 s": float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "first prompt s": float(np.mean(first)),
        "requests": len(latencies),
        "failed": len(failures),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts to measure (1 2)")
    p.add_argument("--clients", type=int, default=4, help="annotators prompting at once (4)")
    p.add_argument("--images", type=int, default=6, help="CTs in the archive (6)")
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 32], help="CT size (128 128 32)")
    p.add_argument("--seconds", type=float, default=30, help="measured time per replica count (30)")
    p.add_argument("--model-config", default="segvol-tiny", help="segvol-tiny (default) or segvol-official")
    p.add_argument("--zoom-in", action="store_true", help="zoom-out-zoom-in (default: zoom-out pass only)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        studies = work / "studies"
        studies.mkdir()
        affine = np.diag([1.5, 1.5, 5.0, 1.0])
        for n in range(a.images):
            nib.save(nib.Nifti1Image(synthetic_ct(tuple(a.shape), n), affine), str(studies / f"ct{n}.nii.gz"))
        port = _port()
        proc = orthanc.start(port, work / "orthanc")
        try:
            images = list(orthanc.load_samples(port, work / "orthanc", studies=studies).values())
            for n in a.replicas:
                conf = {
                    "weights": "seeded",
                    "model_config": a.model_config,
                    "zoom_in": str(a.zoom_in).lower(),
                    "versions_dir": str(work / f"versions{n}"),
                }
                args = [x for k, v in conf.items() for x in ("--conf", k, v)]
                cluster = Cluster(
                    f"http://127.0.0.1:{port}/dicom-web",
                    n,
                    work / f"replicas{n}",
                    port=_port(),
                    replica_ports=[_port() for _ in range(n)],
                    args=args,
                )
                with cluster:
                    rows.append((n, measure(cluster, images, a.clients, a.seconds)))
                print(f"{n} replica(s): {rows[-1][1]['requests/s']:.2f} requests/s", file=sys.stderr, flush=True)
        finally:
            orthanc.stop(work / "orthanc")
            proc.wait(20)
    print(
        f"| replicas | requests/s | median s | p95 s | first prompt of an image s | requests | failed |  "
        f"({a.clients} clients, {a.images} CTs {tuple(a.shape)}, {a.model_config}, zoom-in {a.zoom_in})"
    )
    print("|---|---|---|---|---|---|---|")
    for n, m in rows:
        cells = (
            *(f"{m[k]:.2f}" for k in ("requests/s", "median s", "p95 s", "first prompt s")),
            m["requests"],
            m["failed"],
        )
        print(f"| {n} | " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

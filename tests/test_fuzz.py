"""Malformed and hostile requests against a real server: each gets a 4xx with a message, the
server keeps serving, and nothing outside the datastore is read or written."""

from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import phantom
from server import Server

pytestmark = pytest.mark.server
SHAPE = (48, 40, 12)


def _bodies() -> list:
    """params bodies that must all be refused (for the segvol task and the others)."""
    big, nan = 10**12, float("nan")
    bad_points = [
        [[1, 2]],
        [[1, 2, 3, 4]],
        [["a", 2, 3]],
        [[1.5, 2, 3]],
        [[nan, 2, 3]],
        [[-1, 0, 0]],
        [[big, 0, 0]],
        [[0, 0, SHAPE[2]]],
        "1,2,3",
        {"i": 1},
        [[None, 1, 2]],
        [[True, 1, 2]],
        [1, 2, 3],
    ]
    bad_boxes = [
        [0, 0, 0],
        [5, 5, 5, 1, 1, 1],
        [0, 0, 0, big, 1, 1],
        [-3, 0, 0, 1, 1, 1],
        "0,0,0,1,1,1",
        [0, 0, 0, 1, 1, nan],
        [0, 0, 0, 1, 1, "x"],
        {"box": 1},
    ]
    bad_labels = [[999], [0], [-1], ["liver"], [1.5], [nan], [True], 5, "1", [[1]], [224], [10**9]]
    bodies = [{"points": p, "label_prompt": [1]} for p in bad_points]
    bodies += [{"box": b, "texts": "liver"} for b in bad_boxes]
    bodies += [{"label_prompt": lab} for lab in bad_labels]
    bodies += [
        {"points": [[1, 2, 3]], "point_labels": labels, "label_prompt": [1]}
        for labels in ([2], [-1], ["yes"], [1, 0], [nan], "1")
    ]
    bodies += [{"texts": t} for t in ("", " , ", ["liver", ""], [1, 2], {"a": 1}, "x" * 5000, ["liver"] * 40 + [""])]
    bodies += [{"texts": "liver", "result_extension": e} for e in (".exe", "../x.nrrd", ".png", 5)]
    bodies += [{"texts": "liver", "result_dtype": d} for d in ("float64", "int16", 1)]
    bodies += [{"texts": "liver", "zoom_in": z} for z in ("yes", 1, [True])]
    bodies += [{}, {"points": []}, {"texts": None}, {"box": []}]
    return bodies


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    studies = tmp_path_factory.mktemp("studies")
    nib.save(nib.Nifti1Image(phantom(SHAPE), np.eye(4)), str(studies / "ct.nii.gz"))
    conf = {"weights": "seeded", "model_config": "segvol-tiny", "zoom_in": "false"}
    with Server(studies, conf, studies.parent / "server.log") as srv:
        srv.studies = studies
        yield srv


def _snapshot(folder):
    return {p.relative_to(folder): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_a_hundred_bad_requests_get_4xx_and_the_server_stays_up(server, tmp_path):
    url = server.url
    before = _snapshot(server.studies)
    tried = []

    def check(r: requests.Response, what: str):
        tried.append(what)
        assert 400 <= r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
        detail = r.json().get("detail")
        assert detail, f"{what}: no message"
        assert "root:x:" not in r.text

    for task in ("segvol", "segvol_segmentation", "segvol_deepgrow"):
        for body in _bodies():
            payload = json.dumps(body, allow_nan=True)
            r = requests.post(
                f"{url}/infer/{task}",
                params={"image": "ct", "output": "json"},
                files={"params": (None, payload)},
                timeout=120,
            )
            check(r, f"{task} {payload[:80]}")
    for raw in ("{", "[1,2", "nul", "'x'", '{"texts": "liver"', "\x00\x01", "{" * 500):
        r = requests.post(f"{url}/infer/segvol", params={"image": "ct"}, files={"params": (None, raw)}, timeout=60)
        check(r, f"malformed {raw[:20]!r}")
    for image in (
        "../../etc/passwd",
        "/etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "ct/../../x",
        "",
        "x" * 3000,
        "ct.nii.gz",
        "CT",
        "\\..\\x",
    ):
        r = requests.post(
            f"{url}/infer/segvol",
            params={"image": image, "output": "json"},
            files={"params": (None, '{"label_prompt": [1]}')},
            timeout=60,
        )
        check(r, f"image {image[:30]!r}")
    for model in ("nomodel", "../segvol", "segvol%00", "SEGVOL"):
        r = requests.post(f"{url}/infer/{model}", params={"image": "ct"}, files={"params": (None, "{}")}, timeout=60)
        check(r, f"model {model!r}")
    ok_label = np.zeros(SHAPE, np.uint8)
    for tag, content, name, info in (
        ("final", b"not a volume", "label.nii.gz", "{}"),
        ("final", b"", "label.nii.gz", "{}"),
        ("final", b"\x00" * 10, "label.bin", "{}"),
        ("../../escape", None, "label.nii.gz", "{}"),
        ("fin al", None, "label.nii.gz", "{}"),
        ("final", None, "label.nii.gz", '{"label_info": "liver"}'),
        ("final", None, "label.nii.gz", '{"label_info": [{"idx": 1}]}'),
    ):
        if content is None:
            label = io.BytesIO()
            img = nib.Nifti1Image(ok_label, np.eye(4))
            label.write(img.to_bytes())
            content = label.getvalue()
        r = requests.put(
            f"{url}/datastore/label",
            params={"image": "ct", "tag": tag},
            files={"label": (name, content), "params": (None, info)},
            timeout=60,
        )
        check(r, f"label upload tag={tag!r} {name} {len(content)} B")
    r = requests.put(
        f"{url}/datastore/label",
        params={"image": "../../etc/passwd", "tag": "final"},
        files={"label": ("label.nii.gz", content), "params": (None, "{}")},
        timeout=60,
    )
    check(r, "label upload for a path-like image")
    r = requests.post(
        f"{url}/infer/segvol", params={"image": "ct", "output": "bogus"}, files={"params": (None, "{}")}, timeout=60
    )
    check(r, "bad output type")
    r = requests.post(
        f"{url}/infer/segvol",
        params={"image": "ct"},
        data=b"\x89PNG junk",
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    check(r, "wrong content type")

    # params of every JSON type, on every endpoint that takes them
    for raw in ("null", '"liver"', "5", "[1, 2]", "true", "1.5"):
        for task in ("segvol", "segvol_segmentation", "segvol_deepgrow"):
            r = requests.post(f"{url}/infer/{task}", params={"image": "ct"}, files={"params": (None, raw)}, timeout=60)
            check(r, f"infer {task} params {raw}")
        r = requests.put(
            f"{url}/datastore/label",
            params={"image": "ct", "tag": "final"},
            files={"label": ("label.nii.gz", content), "params": (None, raw)},
            timeout=60,
        )
        check(r, f"label upload params {raw}")
        if raw == "null":  # no params at all asks for the defaults: a round would start, a batch would run
            continue
        for path in ("/activelearning/random", "/train/segvol", "/batch/infer/segvol"):
            r = requests.post(url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
            check(r, f"{path} body {raw}")
    for strategy in ("nosuch", "../random", "RANDOM"):
        check(requests.post(f"{url}/activelearning/{strategy}", json={}, timeout=60), f"strategy {strategy!r}")
    # a request never starts a round or a batch it did not ask for correctly
    for body in (
        {"max_epochs": -1},
        {"max_epochs": "many"},
        {"steps": -1},
        {"steps": "many"},
        {"steps": 1.5},
        {"steps": True},
        {"steps": 10**9},
        {"lr": 0},
        {"lr": "fast"},
        {"lr": float("nan")},
        {"seed": -3},
        {"segvol": {"steps": 5}},
    ):
        check(requests.post(f"{url}/train/segvol", data=json.dumps(body, allow_nan=True), timeout=60), f"train {body}")
    check(requests.post(f"{url}/train/nosuch", json={}, timeout=60), "train an unknown model")
    check(requests.post(f"{url}/train/", json={"segvol": {"steps": -1}}, timeout=60), "train all, bad steps")
    check(requests.post(f"{url}/train/", json={"nosuch": {}}, timeout=60), "train all, unknown model")
    for body in (
        {},
        {"label_prompt": [999]},
        {"texts": "liver", "max_workers": -1},
        {"texts": "liver", "save_label": "yes"},
        {"texts": "liver", "label_tag": "../x"},
        {"texts": "liver", "points": "1,2,3"},
        {"texts": "liver", "exact_text": "yes"},
    ):
        check(requests.post(f"{url}/batch/infer/segvol", json=body, timeout=60), f"batch {body}")
    check(requests.post(f"{url}/batch/infer/nosuch", json={"texts": "liver"}, timeout=60), "batch unknown model")
    r = requests.get(f"{url}/train/", timeout=30)
    assert r.status_code == 404, f"a round was started: {r.text}"  # no task has ever run
    r = requests.get(f"{url}/batch/infer", timeout=30)
    assert r.status_code == 404, f"a batch was started: {r.text}"
    for path in ("/ohif/..%2F..%2F..%2Fetc%2Fpasswd", "/ohif/app-config.js?x=../../etc/passwd", "/ohif/%00"):
        r = requests.get(url + path, timeout=30)
        assert r.status_code < 500 and "root:x:" not in r.text, (path, r.status_code)
        tried.append(f"ohif {path}")

    assert len(tried) >= 100, len(tried)
    good = requests.post(
        f"{url}/infer/segvol",
        params={"image": "ct", "output": "json"},
        files={"params": (None, '{"label_prompt": [1]}')},
        timeout=120,
    )
    assert good.status_code == 200 and good.json()["label_names"] == {"liver": 1}
    after = _snapshot(server.studies)
    changed = {p for p in set(after) | set(before) if after.get(p) != before.get(p)}
    # the team store's lock files (the scorer takes its lock whenever its thread starts) are bookkeeping
    changed = {p for p in changed if not (p.parts[0] == ".segvol" and p.name.endswith(".lock"))}
    # no label, no escaped file; the team store's SQLite journal changes with the scorer's scores and the leases
    journal = {Path(".segvol/team.sqlite-wal"), Path(".segvol/team.sqlite-shm")}
    assert changed <= {Path("datastore_v2.json"), Path(".lock")} | journal, sorted(changed)
    print(f"{len(tried)} bad requests, all 4xx with a message; the server kept serving")

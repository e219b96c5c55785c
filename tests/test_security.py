"""A server a hospital can deploy (folder datastore, real MONAI Label processes): no file outside
the datastore read or written whatever the ids and uploads say, changes beyond labels off without
sign-in, every list and body bounded, one request never freezing Next image for the others, one
unreadable file never stopping anyone, and a second process never undoing a save.

Authentication (tokens and roles) is in test_auth.py, the archive's faults in test_dicomweb.py."""

from __future__ import annotations

import gzip
import json
import struct
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import phantom
from server import Server

pytestmark = pytest.mark.server
SHAPE = (48, 40, 12)
AFFINE = np.diag([2.0, 2.0, 5.0, 1.0])
IMAGES = [f"ct{n:02d}" for n in range(12)]
CONF = {"weights": "seeded", "model_config": "segvol-tiny", "zoom_in": "false"}
SECRET = bytes(range(256)) * (int(np.prod(SHAPE)) // 256 + 1)


def _studies(folder: Path, images=IMAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(images):
        nib.save(nib.Nifti1Image(phantom(SHAPE, seed=n), AFFINE), str(folder / f"{name}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("security")
    (root / "secret.bin").write_bytes(SECRET[: int(np.prod(SHAPE))])
    return root


@pytest.fixture(scope="module")
def server(work):
    """Auth off, datastore changes turned on (to reach the path checks behind them), 1 MB uploads;
    one image in the folder is a truncated file."""
    studies = _studies(work / "studies")
    (studies / "broken.nii.gz").write_bytes((studies / "ct00.nii.gz").read_bytes()[:600])
    conf = {**CONF, "datastore_changes": "true", "max_upload_mb": "1"}
    with Server(studies, conf, work / "server.log") as srv:
        srv.studies = studies
        yield srv


def _files(root: Path) -> dict:
    """Every file but the team store and the logs, with its modification time."""
    return {
        p: p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and ".segvol" not in p.parts and p.suffix != ".log"
    }


def _save(srv, image: str, name: str, data: bytes, params: dict | None = None) -> requests.Response:
    return requests.put(
        f"{srv.url}/datastore/label",
        params={"image": image, "tag": "final"},
        files={"params": (None, json.dumps(params or {})), "label": (name, data)},
        timeout=60,
    )


def _nifti_bytes(array: np.ndarray, affine=AFFINE, compress: bool = True) -> bytes:
    img = nib.Nifti1Image(array, affine)
    raw = img.to_bytes()
    return gzip.compress(raw) if compress else raw


def _detached_nrrd(target: Path) -> bytes:
    sizes = " ".join(map(str, SHAPE))
    return (
        f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {sizes}\nspace: left-posterior-superior\n"
        "space directions: (-2,0,0) (0,-2,0) (0,0,5)\nspace origin: (0,0,0)\nencoding: raw\n"
        f"data file: {target}\n\n"
    ).encode()


@pytest.mark.parametrize("name", ["x.nhdr", "label.nrrd", "label.nii.gz", "label.bin"])
def test_an_upload_naming_another_file_is_refused_whatever_its_name(server, work, name):
    before = _files(server.studies)
    r = _save(server, "ct01", name, _detached_nrrd(work / "secret.bin"), {"client_id": "mallory"})
    assert r.status_code == 400 and "data file" in r.json()["detail"], r.text
    assert _files(server.studies) == before  # nothing written
    r = requests.get(f"{server.url}/segvol/labels/voxels", params={"image": "ct01"}, timeout=30)
    assert r.status_code == 404 and SECRET[:64] not in r.content


def test_a_label_is_read_by_its_content_not_its_name(server):
    label = np.zeros(SHAPE, np.uint8)
    label[5:20, 5:20, 2:6] = 1
    r = _save(server, "ct02", "label.nhdr", _nifti_bytes(label), {"label_info": [{"name": "liver", "idx": 1}]})
    assert r.status_code == 200, r.text
    r = requests.get(f"{server.url}/segvol/labels/voxels", params={"image": "ct02"}, timeout=30)
    got = np.frombuffer(r.content, np.uint8).reshape(SHAPE, order="F")
    np.testing.assert_array_equal(got, label)


def test_a_small_file_declaring_a_huge_volume_is_refused_before_it_is_inflated(server):
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 300))
    header.set_data_dtype(np.uint16)
    header["vox_offset"] = 352
    bomb = gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * (50 << 20), 9)  # ~50 kB declaring 600 MB
    assert len(bomb) < 300_000
    t0 = time.perf_counter()
    r = _save(server, "ct03", "label.nii.gz", bomb)
    assert r.status_code == 400 and "1000" in r.json()["detail"] and "48" in r.json()["detail"], r.text
    assert time.perf_counter() - t0 < 5


def test_uploads_and_bodies_past_their_bounds_are_refused_with_413(server):
    big = np.zeros(2_000_000, np.uint8).tobytes()  # 2 MB > max_upload_mb 1
    r = _save(server, "ct04", "label.bin", big)
    assert r.status_code == 413 and "MB" in r.json()["detail"], r.text
    r = requests.post(f"{server.url}/activelearning/first", data=b"{" + b" " * (2 << 20) + b"}", timeout=30)
    assert r.status_code == 413, r.text


@pytest.mark.parametrize(
    "image",
    ["../outside/planted", "..", "a/../../b", "/tmp/planted", "x\\..\\y", ".hidden", "ct\x00x", "é" * 3, "a" * 200],
)
def test_a_new_image_id_that_is_a_path_is_refused_and_nothing_is_written(server, work, image):
    before = _files(work)
    ct = _nifti_bytes(phantom(SHAPE).astype(np.int16))
    r = requests.put(
        f"{server.url}/datastore/image", params={"image": image}, files={"file": ("ct.nii.gz", ct)}, timeout=30
    )
    assert r.status_code == 400 and "image id" in r.json()["detail"], r.text
    assert _files(work) == before
    assert not (work / "outside").exists() and not Path("/tmp/planted.nii.gz").exists()


def test_an_image_is_added_by_its_content_under_the_servers_own_name(server, work):
    ct = phantom(SHAPE, seed=7).astype(np.int16)
    r = requests.put(
        f"{server.url}/datastore/image",
        params={"image": "added1"},
        files={"file": ("evil.nhdr", _nifti_bytes(ct))},
        timeout=30,
    )
    assert r.status_code == 200 and r.json() == {"image": "added1"}, r.text
    stored = server.studies / "added1.nii.gz"
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(stored)).dataobj), ct)
    r = requests.put(
        f"{server.url}/datastore/image",
        params={"image": "added2"},
        files={"file": ("x.nii.gz", _detached_nrrd(work / "secret.bin"))},
        timeout=30,
    )
    assert r.status_code == 400 and not list(server.studies.glob("added2*"))
    r = requests.put(
        f"{server.url}/datastore/image", params={"image": "added1"}, files={"file": ("x.nii.gz", _nifti_bytes(ct))}
    )
    assert r.status_code == 409, r.text
    assert requests.delete(f"{server.url}/datastore/image", params={"id": "added1"}, timeout=30).status_code == 200
    assert not stored.exists()


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("get", "/datastore/image", {"image": "../secret"}),
        ("get", "/datastore/image", {"image": "/etc/passwd"}),
        ("head", "/datastore/image", {"image": "../../etc/passwd"}),
        ("get", "/datastore/image/info", {"image": "../ct01"}),
        ("get", "/datastore/label", {"label": "ct01", "tag": "../../../etc"}),
        ("get", "/datastore/label", {"label": "../x", "tag": "final"}),
        ("get", "/datastore/label/info", {"label": "ct01", "tag": "a/b"}),
        ("delete", "/datastore/label", {"id": "ct01", "tag": "../final"}),
        ("delete", "/datastore/image", {"id": "../studies"}),
        ("get", "/segvol/labels", {"image": "../ct01"}),
        ("get", "/segvol/labels/voxels", {"image": "ct01", "seg": "../../x"}),
        ("get", "/proxy/dicom/wado/../../tools", {}),
        ("post", "/proxy/dicom/stow/studies", {}),
        ("get", "/proxy/dicom/system", {}),
        ("put", "/model/segvol", {}),
        ("put", "/session/", {}),
        ("post", "/reload", {}),
        ("post", "/infer/wsi/segvol", {"image": "ct01"}),
        ("post", "/infer/wsi_v2/segvol", {"image": "ct01", "session_id": "../.."}),
        ("post", "/scoring/anything", {}),
        ("post", "/scoring/", {}),
        ("get", "/datastore/dataset", {}),
    ],
)
def test_ids_that_are_paths_and_retired_routes_get_4xx(server, work, method, path, params):
    before = _files(work)
    r = requests.request(method, f"{server.url}{path}", params=params, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if method != "head":
        assert "detail" in r.json()
        assert SECRET[:64] not in r.content and b"root:" not in r.content
    assert _files(work) == before


def test_the_server_keeps_serving_after_the_retired_reload(server):
    assert requests.post(f"{server.url}/reload", timeout=30).status_code == 404
    health = requests.get(f"{server.url}/segvol/health", timeout=30)
    assert health.status_code == 200 and health.json()["ready"], health.text
    r = requests.get(f"{server.url}/ohif/..", timeout=30)  # MONAI Label's answered 500
    assert r.status_code == 200 and b"<html" in r.content.lower()


def test_infer_takes_only_a_datastore_image(server, work):
    cases = [
        ({"image": "ct01"}, {"label_prompt": [1], "save_label": True, "label_tag": "final"}, {}),
        ({"image": "ct01"}, {"label_prompt": [1], "image": "/etc/passwd"}, {}),
        ({"image": "ct01"}, {"label_prompt": [1], "model": "x"}, {}),
        ({}, {"label_prompt": [1]}, {"file": ("x.nhdr", _detached_nrrd(work / "secret.bin"))}),
        ({"image": "ct01", "session_id": "abc"}, {"label_prompt": [1]}, {}),
        ({"image": "ct01"}, {"label_prompt": [1]}, {"label": ("l.bin", b"\0" * 10)}),
        ({"image": "../secret"}, {"label_prompt": [1]}, {}),
    ]
    for query, params, files in cases:
        r = requests.post(
            f"{server.url}/infer/segvol",
            params={**query, "output": "json"},
            files={"params": (None, json.dumps(params)), **files},
            timeout=60,
        )
        assert r.status_code in (400, 404), (query, params, r.status_code, r.text)
        assert SECRET[:64] not in r.content


@pytest.mark.parametrize(
    ("route", "body", "what"),
    [
        ("/activelearning/uncertainty", {"labels": ["liver"] * 150}, "labels"),
        ("/activelearning/uncertainty", {"labels": ["x" * 500]}, "labels"),
        ("/activelearning/first", {"client_id": "a", "junk": list(range(5000))}, "junk"),
        ("/activelearning/first", {"deep": [[[[[[[[1]]]]]]]]}, "nested"),
        ("/train/segvol", {"train_steps": 1, "junk": "x" * 5000}, "junk"),
        ("/activelearning/first", {"client_id": "\ud800"}, "Unicode"),
        ("/activelearning/uncertainty", {"labels": ["liver", "no such organ"]}, "not SegVol categories"),
    ],
)
def test_lists_and_strings_past_their_bounds_are_refused_naming_them(server, route, body, what):
    r = requests.post(f"{server.url}{route}", json=body, timeout=30)
    assert r.status_code == 400 and what in r.json()["detail"], r.text


@pytest.mark.parametrize(
    "params",
    [
        {"points": [[1, 2, 3]] * 300, "point_labels": [1] * 300, "label_prompt": [1]},
        {"texts": ["liver"] * 40},
        {"texts": ",".join(["liver"] * 40)},
        {"label_prompt": [1] * 300},
    ],
)
def test_prompts_past_their_bounds_are_refused(server, params):
    r = requests.post(
        f"{server.url}/infer/segvol",
        params={"image": "ct01", "output": "json"},
        files={"params": (None, json.dumps(params))},
        timeout=60,
    )
    assert r.status_code == 400 and "at most" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ('{"label_prompt": [' + "9" * 5000 + "]}", "cannot be read"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "params"),
        ('{"label_info": [{"name": "\\ud800"}]}', "Unicode"),
    ],
)
def test_params_json_can_not_become_a_500(server, text, what):
    for r in (
        requests.post(
            f"{server.url}/infer/segvol",
            params={"image": "ct01", "output": "json"},
            files={"params": (None, text)},
            timeout=60,
        ),
        requests.put(
            f"{server.url}/datastore/label",
            params={"image": "ct01", "tag": "final"},
            files={"params": (None, text), "label": ("l.bin", b"\0" * int(np.prod(SHAPE)))},
            timeout=60,
        ),
    ):
        assert r.status_code in (400, 413) and what in r.json()["detail"], r.text


def test_a_body_limit_is_the_routes_not_the_clients_say(server):
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    r = requests.post(f"{server.url}/activelearning/random", data=b"x" * (3 << 20), headers=multipart, timeout=30)
    assert r.status_code == 413 and len(r.content) < 1000, r.status_code
    twice = [("Content-Type", "application/json"), ("Content-Type", "multipart/form-data; boundary=x")]
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/activelearning/random")
    for k, v in twice + [("Content-Length", "2")]:
        conn.putheader(k, v)
    conn.endheaders(b"{}")
    answer = conn.getresponse()
    assert answer.status == 400 and b"Content-Type" in answer.read()
    conn.close()


def test_a_label_info_idx_that_only_looks_like_a_number_is_400(server):
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 2:5, 2] = 1
    for idx in ("²", "١", "1e3", " ", 10**12):
        r = _save(server, "ct05", "l.bin", label.tobytes(order="F"), {"label_info": [{"name": "liver", "idx": idx}]})
        assert r.status_code == 400 and "idx" in r.json()["detail"], (idx, r.text)


def test_an_unreadable_image_is_skipped_by_every_strategy_and_listed_once(server):
    seen = set()
    for n, strategy in enumerate(["uncertainty", "random", "first"] * 5):
        r = requests.post(f"{server.url}/activelearning/{strategy}", json={"client_id": f"reader{n}"}, timeout=120)
        assert r.status_code == 200, r.text
        seen.add(r.json()["id"])
    assert "broken" not in seen and len(seen) > 3
    status = requests.get(f"{server.url}/segvol/status", timeout=30).json()
    assert [u["image"] for u in status["unreadable_images"]] == ["broken"]
    assert "broken" in status["unreadable_images"][0]["error"]
    assert server.log.read_text().count("image broken cannot be read") == 1
    r = requests.post(
        f"{server.url}/infer/segvol",
        params={"image": "broken", "output": "json"},
        files={"params": (None, json.dumps({"label_prompt": [1]}))},
        timeout=60,
    )
    assert r.status_code in (400, 422), r.text


def test_next_image_over_categories_nobody_scored_runs_no_model_on_the_request(server):
    """Uncertainty over 16 categories no one scored: the answer comes from the team's stored scores
    (or at random) and says so; the background scorer's passes do not move while it answers."""
    names = ["liver", "spleen", "pancreas", "aorta", "stomach", "gallbladder", "esophagus", "duodenum"]
    names += ["left kidney", "right kidney", "bladder", "colon", "heart", "brain", "trachea", "prostate"]

    def scoring() -> dict:
        return requests.get(f"{server.url}/segvol/status", params={"client_id": "watch"}, timeout=30).json()["scoring"]

    moved = []
    for _ in range(3):  # a pass the scorer starts on its own may coincide once; one per request would not
        deadline = time.time() + 120
        while scoring()["state"] != "idle" and time.time() < deadline:  # the scorer done with what it had
            time.sleep(0.3)
        passes = scoring()["passes"]
        r = requests.post(
            f"{server.url}/activelearning/uncertainty", json={"client_id": "asker", "labels": names}, timeout=60
        )
        assert r.status_code == 200, r.text
        pick = r.json()
        assert "scored_by" in pick and pick.get("categories", []) != sorted(names)
        moved.append(scoring()["passes"] - passes)
        if moved[-1] == 0:
            break
    assert moved[-1] == 0, moved


def test_health_answers_while_a_save_runs(server):
    """The event loop never does a save's work: health stays instant while labels are saved."""
    label = np.zeros(SHAPE, np.uint8)
    label[1:30, 1:30, 1:10] = 1

    def saves() -> None:
        for n in range(4):
            assert _save(server, f"ct{6 + n:02d}", "l.bin", label.tobytes(order="F")).status_code == 200

    saver = threading.Thread(target=saves)
    saver.start()
    seconds = []
    while saver.is_alive():
        t0 = time.perf_counter()
        r = requests.get(f"{server.url}/segvol/health", timeout=10)
        assert r.status_code == 200, r.text
        seconds.append(time.perf_counter() - t0)
    saver.join()
    assert len(seconds) >= 3 and max(seconds) < 0.2, seconds


def test_without_sign_in_changes_beyond_labels_are_off_unless_turned_on(tmp_path):
    studies = _studies(tmp_path / "studies", ["a", "b"])
    with Server(studies, CONF, tmp_path / "server.log") as srv:
        before = _files(studies)
        ct = _nifti_bytes(phantom(SHAPE).astype(np.int16))
        calls = [
            ("put", "/datastore/image", {"image": "c"}, {"file": ("c.nii.gz", ct)}),
            ("delete", "/datastore/image", {"id": "a"}, None),
            ("delete", "/datastore/label", {"id": "a", "tag": "final"}, None),
            ("put", "/datastore/label/info", {"label": "a", "tag": "final"}, {"info": (None, "{}")}),
            ("put", "/datastore/image/info", {"image": "a"}, {"info": (None, "{}")}),
        ]
        for method, path, params, files in calls:
            r = requests.request(method, f"{srv.url}{path}", params=params, files=files, timeout=30)
            assert r.status_code == 403 and "datastore_changes" in r.json()["detail"], (path, r.text)
        assert _files(studies) == before

        # and a second process on the same folder never undoes a save (folder index re-read)
        label = np.zeros(SHAPE, np.uint8)
        label[3:9, 3:9, 2:4] = 1
        with Server(studies, CONF, tmp_path / "second.log") as other:
            for _ in range(3):  # the random strategy writes the index (last handed out)
                assert requests.post(f"{other.url}/activelearning/random", json={}, timeout=60).status_code == 200
            named = {"client_id": "ada", "label_info": [{"name": "liver"}]}
            r = _save(srv, "a", "l.bin", label.tobytes(order="F"), named)
            assert r.status_code == 200, r.text
            for n in range(3):
                r = requests.post(f"{other.url}/activelearning/random", json={"client_id": f"b{n}"}, timeout=60)
                assert r.status_code == 200 and r.json()["id"] == "b", r.text  # "a" is labelled now
        index = json.loads((studies / "datastore_v2.json").read_text())
        final = index["objects"]["a"]["labels"]["final"]["info"]
        assert final["client"] == "ada" and [s["name"] for s in final["segments"]] == ["liver"]


def test_a_nifti_pair_header_is_not_an_upload(server):
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.uint8)
    pair = bytearray(header.binaryblock)
    pair[344:348] = b"ni1\0"
    r = _save(server, "ct05", "label.hdr", bytes(pair) + struct.pack("<I", 0))
    assert r.status_code == 400, r.text

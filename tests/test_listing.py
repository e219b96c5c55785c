"""The archive's listing on a real Orthanc: after the first (paged QIDO) listing, a refresh asks
only for what changed (Orthanc's series ids, a lookup of each new one), finds new and deleted series
and SEGs without any QIDO listing, and falls back to full listings where the archive is not Orthanc."""

from __future__ import annotations

import http.server
import threading

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from synthetic_series import ct_series, seg_of

import lib.archive.listing as listing_module
from archive import PASSWORD, USER, Archive
from lib.archive.listing import ArchiveListing, orthanc_id
from lib.archive.orthanc_rest import OrthancRest


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    with Archive(tmp_path_factory.mktemp("orthanc")) as archive:
        yield archive


class Counted(DICOMwebClient):
    """The real client, counting its QIDO queries."""

    queries = 0

    def search_for_series(self, *args, **kwargs):
        self.queries += 1
        return super().search_for_series(*args, **kwargs)


def client(archive: Archive) -> Counted:
    return Counted(f"{archive.url}/dicom-web", session=create_session_from_user_pass(USER, PASSWORD))


def post(archive: Archive, files: list[bytes]) -> None:
    for f in files:
        requests.post(f"{archive.url}/instances", data=f, auth=(USER, PASSWORD), timeout=30).raise_for_status()


def updated(listing: ArchiveListing) -> list[str]:
    listing.invalidate()
    return listing.images()


def test_new_and_deleted_series_and_segs_are_found_without_listing_again(archive):
    web = client(archive)
    listing = ArchiveListing(web, {"Modality": "CT"}, refresh_seconds=3600)
    before = listing.images()
    assert set(archive.series.values()) <= set(before)
    assert listing._rest is not None  # Orthanc's REST API was found beside its DICOMweb root
    first = web.queries
    assert first == 2  # one page of CT series, one of SEGs

    study, series, files = ct_series(1)
    post(archive, files + [seg_of(study, series, 1)])
    images = updated(listing)
    assert set(images) == set(before) | {series}
    [seg] = [s for s in listing.segs() if s.study == study]
    assert not seg.draft
    assert web.queries == first  # found through Orthanc's ids and one lookup each: no QIDO

    # deleted: a listed series (its id computed from the QIDO answer) and the new study (looked up)
    lung = next(iter(archive.series.values()))
    patient = archive.get("/dicom-web/series", params={"SeriesInstanceUID": lung, "includefield": "PatientID"})
    pid = patient.json()[0].get("00100020", {}).get("Value", [""])[0]
    gone = orthanc_id(pid, archive.study_of(lung), lung)
    requests.delete(f"{archive.url}/series/{gone}", auth=(USER, PASSWORD), timeout=30).raise_for_status()
    study_id = archive.get(f"/series/{orthanc_id('BENCH00001', study, series)}").json()["ParentStudy"]
    requests.delete(f"{archive.url}/studies/{study_id}", auth=(USER, PASSWORD), timeout=30).raise_for_status()
    images = updated(listing)
    assert lung not in images and series not in images
    assert not [s for s in listing.segs() if s.study == study]
    assert web.queries == first  # Orthanc's change log records no deletion; its ids do

    fresh = ArchiveListing(client(archive), {"Modality": "CT"}, refresh_seconds=3600)
    assert sorted(fresh.images()) == sorted(images)  # the same as a full listing from scratch


def test_a_filter_only_the_archive_can_match_is_asked_of_it_per_new_series(archive):
    web = client(archive)
    listing = ArchiveListing(web, {"Modality": "CT", "StudyDate": "20260101"}, refresh_seconds=3600)  # a study key
    before = listing.images()
    queries = web.queries
    study, series, files = ct_series(2)
    post(archive, files)
    assert set(updated(listing)) == set(before) | {series}
    assert web.queries == queries + 1  # one QIDO on the new series' UID, not a listing


def test_many_new_series_at_once_are_listed_in_full(archive, monkeypatch):
    web = client(archive)
    listing = ArchiveListing(web, {"Modality": "CT"}, refresh_seconds=3600)
    before = listing.images()
    monkeypatch.setattr(listing_module, "MAX_LOOKUPS", 1)
    added = [ct_series(n) for n in (3, 4)]
    for _, _, files in added:
        post(archive, files)
    queries = web.queries
    assert set(updated(listing)) == set(before) | {series for _, series, _ in added}
    assert web.queries == queries + 2  # a bulk import: two QIDO listings, not one lookup per series


def test_a_dicomweb_server_that_is_not_orthanc_is_listed_in_full(tmp_path):
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            other = DICOMwebClient(f"http://127.0.0.1:{server.server_port}/dicom-web")
            assert OrthancRest.beside(other) is None  # GET /system: 404, not Orthanc
        finally:
            server.shutdown()


def test_orthanc_down_at_the_first_listing_is_asked_again(tmp_path):
    with Archive(tmp_path / "orthanc", studies=tmp_path / "none") as archive:
        web = client(archive)
        listing = ArchiveListing(web, {"Modality": "CT"}, refresh_seconds=3600)
        archive.stop()
        with pytest.raises(ConnectionError):
            listing.images()
        archive.start()
        study, series, files = ct_series(5)
        post(archive, files)
        assert listing.images() == [series]
        assert listing._rest is not None  # the probe that found nobody did not decide "not Orthanc"

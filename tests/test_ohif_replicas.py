"""The OHIF SegVol mode through HAProxy and two replicas (real Chromium, Orthanc, MONAI Label):
two annotators get different images, each image's prompts are answered by one replica, and when
the replica serving an annotator is killed with SIGKILL, her next prompt is answered by the other
one and her save stores the SEG she sees, typed from the result the surviving replica served."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from archive import Archive, dciodvfy_errors
from cluster import replica_cluster
from ohif import (
    ANNOTATORS,
    CHROMIUM_ARGS,
    chromium,
    class_prompt,
    index_instances,
    next_image,
    open_mode,
    page_labelmap,
    phantom_studies,
    seg_labelmap,
    seg_of,
    set_annotator,
    shape_of,
)

pytestmark = pytest.mark.e2e
REPLICA = "x-segvol-replica"


def test_annotators_in_ohif_through_haproxy_lose_nothing_when_their_replica_dies(tmp_path):
    from playwright.sync_api import sync_playwright

    with (
        Archive(tmp_path / "orthanc", studies=phantom_studies(tmp_path / "studies")) as archive,
        replica_cluster(tmp_path, archive) as cluster,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        pages = []
        for name in ANNOTATORS:
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            page.errors = []
            page.on("pageerror", lambda e, page=page: page.errors.append(str(e)))
            page.annotator = name
            pages.append(page)
        landing = archive.study_of(archive.series["abdomen1"])
        images, owner = {}, {}
        for page in pages:
            open_mode(page, cluster, landing)
            set_annotator(page)
            images[page.annotator] = next_image(page)
            owner[page.annotator] = class_prompt(page, "liver").headers[REPLICA]
            again = class_prompt(page, "liver", changes=False)  # a further prompt: the same replica
            assert again.headers[REPLICA] == owner[page.annotator]
        assert images[ANNOTATORS[0]] != images[ANNOTATORS[1]], images

        page = pages[0]
        victim = owner[page.annotator]
        cluster.replica(victim).kill(signal.SIGKILL)
        answered = class_prompt(page, "liver", changes=False)
        survivor = answered.headers[REPLICA]
        assert survivor != victim

        with page.expect_response(lambda r: "/datastore/label" in r.url, timeout=120_000) as resp:
            page.locator("#segvol-save").click()
        assert resp.value.status == 200, resp.value.text()
        assert resp.value.headers[REPLICA] == survivor
        page.locator("#segvol-message").filter(has_text="Saved to the archive").wait_for(timeout=30_000)

        image = images[page.annotator]
        shape = shape_of(archive, image)
        index_instances(archive, image)
        seg = seg_of(archive, image, resp.value.json()["SeriesInstanceUID"])
        in_page = page_labelmap(page, shape)
        assert (in_page == "liver").sum() > 0
        np.testing.assert_array_equal(seg_labelmap(seg, shape), in_page)
        (segment,) = seg.SegmentSequence
        assert (segment.SegmentLabel, segment.SegmentAlgorithmType) == ("liver", "AUTOMATIC")
        assert dciodvfy_errors(seg) == []
        assert not [e for p in pages for e in p.errors], [e for p in pages for e in p.errors]
        browser.close()

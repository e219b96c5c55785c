"""Provenance under the app's overlap rule (issue #21 item 5): a saved label is compared with what the
page showed of each served result, not with the raw served masks. The page merges results with
``apply`` below, written here apart from the server's code; no server is needed."""

from __future__ import annotations

import numpy as np
import pytest

from lib.team.provenance import AUTOMATIC, MANUAL, SEMIAUTOMATIC, Provenance
from lib.team.store import open_store

LIVER, SPLEEN, RIGHT_LUNG, LEFT_LUNG = 1, 2, 84, 85
SHAPE = (23, 19, 7)  # 3059 voxels: not a whole number of bytes once packed


def apply(labelmap: np.ndarray, result_values: list[int], result_labelmap: np.ndarray) -> np.ndarray:
    """The page's merge: a result replaces its own classes (free voxels and voxels of its classes take
    the result's value, 0 where it has none); voxels of any other class keep it."""
    replaced = (labelmap == 0) | np.isin(labelmap, result_values)
    merged = labelmap.copy()
    merged[replaced] = result_labelmap[replaced]
    return merged


@pytest.fixture
def provenance(team_db) -> Provenance:
    return Provenance(open_store(team_db))


def _serve(provenance: Provenance, labelmap: np.ndarray, names: dict[int, str], image: str = "img") -> int:
    prompts = [{"value": v, "text": n} for v, n in names.items()]
    return provenance.record(image, "ada", "v1", "segvol", prompts, labelmap, names, 0.1)


def _issue(provenance: Provenance) -> tuple[np.ndarray, int, int, np.ndarray]:
    """ "liver + right lung" (one result), then "left lung" overlapping right lung: the page's label map,
    both result ids and the served left lung."""
    first = np.zeros(SHAPE, np.uint8)
    first[1:8, 2:10, 1:5] = LIVER
    first[10:18, 3:12, 0:6] = RIGHT_LUNG
    second = np.zeros(SHAPE, np.uint8)
    second[14:22, 8:17, 1:7] = LEFT_LUNG  # overlaps right lung
    r1 = _serve(provenance, first, {LIVER: "liver", RIGHT_LUNG: "right lung"})
    r2 = _serve(provenance, second, {LEFT_LUNG: "left lung"})
    page = apply(apply(np.zeros(SHAPE, np.uint8), [LIVER, RIGHT_LUNG], first), [LEFT_LUNG], second)
    assert ((second == LEFT_LUNG) & (page == RIGHT_LUNG)).any()  # the page hid part of left lung
    return page, r1, r2, second == LEFT_LUNG


def test_an_unedited_label_of_overlapping_results_is_automatic_for_every_value(provenance):
    page, r1, r2, _ = _issue(provenance)
    for value, result in ((LIVER, r1), (RIGHT_LUNG, r1), (LEFT_LUNG, r2)):
        origin = provenance.origin("img", value, page)
        assert (origin.type, origin.result, origin.added, origin.removed) == (AUTOMATIC, result, 0, 0), value
        assert origin.model_version == "v1" and [p["value"] for p in origin.prompts] == [value]


def test_a_reprompted_class_is_automatic_from_the_result_the_page_shows(provenance):
    lung = np.zeros(SHAPE, np.uint8)
    lung[5:15, 5:15, :] = RIGHT_LUNG
    liver_a = np.zeros(SHAPE, np.uint8)
    liver_a[0:10, 0:10, 1:6] = LIVER
    liver_b = np.zeros(SHAPE, np.uint8)
    liver_b[2:12, 1:9, 0:5] = LIVER
    _serve(provenance, lung, {RIGHT_LUNG: "right lung"})
    ra = _serve(provenance, liver_a, {LIVER: "liver"})
    rb = _serve(provenance, liver_b, {LIVER: "liver"})
    page = apply(apply(np.zeros(SHAPE, np.uint8), [RIGHT_LUNG], lung), [LIVER], liver_a)
    shown_a = page.copy()
    page = apply(page, [LIVER], liver_b)
    assert ((liver_b == LIVER) & (page == RIGHT_LUNG)).any()
    origin = provenance.origin("img", LIVER, page)
    assert (origin.type, origin.result) == (AUTOMATIC, rb)
    # saved before the second result reached the page: still AUTOMATIC, from the first
    origin = provenance.origin("img", LIVER, shown_a)
    assert (origin.type, origin.result) == (AUTOMATIC, ra)
    # alone on the page (no other segment) the newest is still named
    alone = np.where(liver_b == LIVER, LIVER, 0).astype(np.uint8)
    assert provenance.origin("img", LIVER, alone).result == rb


def test_an_edit_counts_only_the_voxels_the_annotator_changed(provenance):
    page, _, r2, served = _issue(provenance)
    edited = page.copy()
    free = np.argwhere(page == 0)[:5]
    edited[tuple(free.T)] = LEFT_LUNG
    shown = np.argwhere(page == LEFT_LUNG)[:3]
    edited[tuple(shown.T)] = 0
    origin = provenance.origin("img", LEFT_LUNG, edited)
    assert (origin.type, origin.result, origin.added, origin.removed) == (SEMIAUTOMATIC, r2, 5, 3)
    hidden = int(np.count_nonzero(served & (page == RIGHT_LUNG)))
    assert hidden > 3  # what the old comparison would have counted as removed on top of the 3


def test_another_class_painted_over_a_value_is_that_class_s_not_removed_from_the_value(provenance):
    page, r1, r2, _ = _issue(provenance)
    edited = page.copy()
    left = np.argwhere(page == LEFT_LUNG)
    edited[tuple(left[:4].T)] = LIVER  # liver: served, so these are voxels added to it
    edited[tuple(left[4:6].T)] = SPLEEN  # spleen: never served
    # left lung lost them to other segments, as the page hides a result under other classes: not removed
    origin = provenance.origin("img", LEFT_LUNG, edited)
    assert (origin.type, origin.result, origin.added, origin.removed) == (AUTOMATIC, r2, 0, 0)
    origin = provenance.origin("img", LIVER, edited)
    assert (origin.type, origin.result, origin.added, origin.removed) == (SEMIAUTOMATIC, r1, 4, 0)
    assert provenance.origin("img", SPLEEN, edited).type == MANUAL
    assert provenance.origin("img", RIGHT_LUNG, edited).type == AUTOMATIC


def test_a_value_never_served_is_manual_and_one_served_on_another_grid_is_uncounted(provenance):
    page, _, _, _ = _issue(provenance)
    assert provenance.origin("img", SPLEEN, page).type == MANUAL
    assert provenance.origin("other image", LIVER, page).type == MANUAL
    elsewhere = np.zeros((10, 10, 10), np.uint8)
    elsewhere[2:5, 2:5, 2:5] = LIVER
    rid = _serve(provenance, elsewhere, {LIVER: "liver"})
    edited = page.copy()
    edited[0, 0, 0] = LIVER
    origin = provenance.origin("img", LIVER, edited)
    assert (origin.type, origin.result, origin.added, origin.removed) == (SEMIAUTOMATIC, rid, 0, 0)
    # an older result on the label's grid that the page shows still makes it AUTOMATIC
    assert provenance.origin("img", LIVER, page).type == AUTOMATIC


def test_the_counts_match_the_rule_written_voxel_by_voxel(provenance):
    """Random overlapping results and edits against the rule computed on whole masks."""
    rng = np.random.default_rng(21)
    values = [LIVER, SPLEEN, RIGHT_LUNG, LEFT_LUNG]
    page = np.zeros(SHAPE, np.uint8)
    served: dict[int, list[tuple[int, np.ndarray]]] = {v: [] for v in values}
    for _ in range(6):
        chosen = [int(v) for v in rng.choice(values, size=int(rng.integers(1, 3)), replace=False)]
        result = np.zeros(SHAPE, np.uint8)
        for v in chosen:
            result[rng.random(SHAPE) < 0.3] = v
        rid = _serve(provenance, result, {v: str(v) for v in chosen})
        for v in chosen:
            served[v].append((rid, result == v))
        page = apply(page, chosen, result)
    edited = page.copy()
    edited[rng.random(SHAPE) < 0.05] = 0
    edited[rng.random(SHAPE) < 0.05] = rng.choice(values)
    for label in (page, edited):
        for v in values:
            origin = provenance.origin("img", v, label)
            if not served[v]:
                assert origin.type == MANUAL
                continue
            saved, others = label == v, (label != 0) & (label != v)
            match = [rid for rid, m in reversed(served[v]) if np.array_equal(saved, m & ~others)]
            if match:
                assert (origin.type, origin.result) == (AUTOMATIC, match[0])
                continue
            rid, m = served[v][-1]
            expected = (SEMIAUTOMATIC, rid, int((saved & ~m).sum()), int((m & ~saved & ~others).sum()))
            assert (origin.type, origin.result, origin.added, origin.removed) == expected

"""Review state, double reading, the team figures and the labels a round learns from, on the team
store alone (no server): a fake clock, MONAI Label's First strategy."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from monailabel.tasks.activelearning.first import First

from lib.rounds.reviewed import ReviewedLabels
from lib.team.double_reading import DoubleReading, chosen
from lib.team.figures import as_csv, team_figures
from lib.team.leases import Leases, WithImages
from lib.team.provenance import Provenance
from lib.team.reviews import ReviewError, Reviews
from lib.team.store import open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def team(team_db):
    store = open_store(team_db)
    clock = Clock()
    reviews = Reviews(store, clock)
    return store, clock, reviews, Provenance(store)


def _save(provenance: Provenance, reviews: Reviews, image: str, client: str, names=("liver",), reading=False, of=None):
    version = provenance.record_save(
        image, client, "final", "base", [{"value": i + 1, "name": n} for i, n in enumerate(names)], None
    )
    return version, reviews.submitted(version, image, client, None, reading, of)


def test_returned_resubmitted_approved(team):
    _, clock, reviews, provenance = team
    v1, review = _save(provenance, reviews, "img", "ada")
    assert review["state"] == "submitted" and [r["version"] for r in reviews.pending()] == [v1]
    with pytest.raises(ReviewError) as own:
        reviews.act(v1, "ada", "approve", None, None, self_review=False)
    assert own.value.status == 403
    with pytest.raises(ReviewError, match="needs a comment"):
        reviews.act(v1, "rita", "return", "  ", {}, self_review=False)
    returned = reviews.act(v1, "rita", "return", "misses the left lobe", {"liver": "segment II"}, False)
    assert returned["state"] == "returned" and returned["segments"] == {"liver": "segment II"}
    assert [r["version"] for r in reviews.returned_to("ada")] == [v1] and reviews.pending() == []
    clock.now += 60
    v2, review = _save(provenance, reviews, "img", "ada")
    assert review == {"state": "submitted", "pair": None, "resubmits": v1}
    assert reviews.of(v1)["state"] == "resubmitted" and reviews.returned_to("ada") == []
    assert reviews.act(v2, "rita", "approve", "", None, False)["state"] == "approved"
    with pytest.raises(ReviewError) as again:  # a second reviewer is told who acted first
        reviews.act(v2, "rex", "return", "no", None, False)
    assert again.value.status == 409 and again.value.by == "rita" and "already approved by rita" in str(again.value)
    with pytest.raises(ReviewError) as missing:
        reviews.act(999, "rita", "approve", "", None, False)
    assert missing.value.status == 404 and "999" in str(missing.value)
    with pytest.raises(ReviewError, match="action must be"):
        reviews.act(v2, "rita", "delete", "", None, False)
    _, events = reviews.of_image("img")
    assert [e["action"] for e in events] == ["submitted", "returned", "resubmitted", "submitted", "approved"]


def test_a_newer_save_supersedes_and_review_names_it(team):
    _, _, reviews, provenance = team
    v1, _ = _save(provenance, reviews, "img", "ada")
    v2, _ = _save(provenance, reviews, "img", "bob")
    with pytest.raises(ReviewError) as old:
        reviews.act(v1, "rita", "approve", "", None, False)
    assert old.value.status == 409 and f"superseded by version {v2} (bob" in str(old.value)


def test_two_reviewers_at_once_one_wins(team):
    _, _, reviews, provenance = team
    version, _ = _save(provenance, reviews, "img", "ada")
    results: list = []
    barrier = threading.Barrier(2)

    def act(who: str, action: str) -> None:
        barrier.wait()
        try:
            results.append(reviews.act(version, who, action, "fix it", None, False)["state"])
        except ReviewError as e:
            results.append(e.status)

    threads = [threading.Thread(target=act, args=a) for a in (("rita", "approve"), ("rex", "return"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)) in (["409", "approved"], ["409", "returned"])
    assert reviews.of(version)["state"] in ("approved", "returned")


def test_a_correction_approves_the_reviewers_version(team):
    _, _, reviews, provenance = team
    v1, _ = _save(provenance, reviews, "img", "ada")
    assert reviews.check_correction(v1, "rita", False)["version"] == v1
    v2, review = _save(provenance, reviews, "img", "rita", of=v1)
    assert review["state"] == "approved" and reviews.of(v1)["state"] == "corrected"
    reviews.record_changes(v2, {"liver": {"added": 3, "removed": 1}})
    assert reviews.of(v2)["changes"] == {"liver": {"added": 3, "removed": 1}}
    with pytest.raises(ReviewError):
        reviews.check_correction(v1, "rex", False)


def _image(fraction: float, want: bool) -> str:
    return next(f"img{n}" for n in range(1000) if chosen(f"img{n}", fraction) == want)


def test_double_reading_is_stable_blind_and_measured(team):
    store, _, reviews, provenance = team
    double = DoubleReading(store, reviews, 0.5)
    picked = [f"img{n}" for n in range(400) if chosen(f"img{n}", 0.5)]
    assert 150 < len(picked) < 250  # about half
    assert chosen("x", 0.0) is False and chosen("x", 1.0) is True
    image = _image(0.5, True)
    assert double.is_reading(image, "ada") and double.seats(image, "ada") == 2
    a = np.zeros((20, 20, 10), np.uint8)
    a[2:12, 2:12, 2:8] = 1
    b = np.zeros_like(a)
    b[4:14, 2:12, 2:8] = 7
    va, review = _save(provenance, reviews, image, "ada", reading=True)
    double.keep(va, image, "ada", a, {1: "liver"}, (1.0, 1.0, 2.0))
    assert review["state"] == "waiting"
    assert double.hidden_from(image, "bob", reviewer=False) == {va}
    assert double.hidden_from(image, "ada", reviewer=False) == set()
    assert double.hidden_from(image, "rita", reviewer=True) == set()
    assert double.awaiting_second("bob") == {image} and double.awaiting_second("ada") == set()
    assert double.seats(image, "bob") == 1  # ada's reading is in: one seat left
    with pytest.raises(ReviewError) as early:
        reviews.act(va, "rita", "approve", "", None, False)
    assert early.value.status == 409 and "second reading" in str(early.value)
    vb, review = _save(provenance, reviews, image, "bob", reading=True)
    double.keep(vb, image, "bob", b, {7: "liver"}, (1.0, 1.0, 2.0))
    assert review == {"state": "submitted", "pair": va, "resubmits": None}
    assert double.hidden_from(image, "bob", reviewer=False) == set()
    figures = double.measure(va, vb)
    inter = int(((a == 1) & (b == 7)).sum())
    assert figures[0]["name"] == "liver" and figures[0]["dice"] == pytest.approx(2 * inter / 1200, abs=1e-4)
    assert figures[0]["ml"] == [pytest.approx(600 * 2 / 1000, abs=0.05)] * 2
    assert [p["version"] for p in reviews.pending()] == [va]  # a pair is listed once
    with pytest.raises(ReviewError, match="adjudicate"):
        reviews.act(vb, "rita", "return", "redo", None, False)
    vc, review = _save(provenance, reviews, image, "rita", of=vb)  # adopted or corrected: the same save
    assert review["state"] == "approved"
    assert reviews.of(va)["state"] == reviews.of(vb)["state"] == "adjudicated"
    assert not double.is_reading(image, "cara")  # decided: a later save is a plain one

    table = team_figures(store, double.all_agreements())
    people = {p["client"]: p for p in table["annotators"]}
    assert people["ada"]["agreement_dice"] == people["bob"]["agreement_dice"] == figures[0]["dice"]
    assert {c["name"]: c["pairs"] for c in table["categories"]} == {"liver": 1}
    assert as_csv(table).splitlines()[0] == "annotators"


def test_a_double_read_image_is_leased_to_two_annotators(team):
    store, clock, reviews, provenance = team
    double = DoubleReading(store, reviews, 0.5)
    image = _image(0.5, True)
    leases = Leases(store, minutes=30, clock=clock)
    first = First()

    class Images:
        def get_unlabeled_images(self, label_tag=None, labels=None) -> list[str]:
            return [image]

    ada, note = leases.next_image("ada", first, {}, Images(), seats=double.seats)
    bob, note_b = leases.next_image("bob", first, {}, Images(), seats=double.seats)
    assert ada["id"] == bob["id"] == image and note is None and note_b is None
    cara, note_c = leases.next_image("cara", first, {}, Images(), seats=double.seats)
    assert cara["id"] == image and "shared with" in note_c  # both seats taken: shared, and told
    # ada saved her reading: the image is labelled, but still offered to those who have not read it
    leases.give_back(image, "ada")
    _save(provenance, reviews, image, "ada", reading=True)

    class Labelled:
        def get_unlabeled_images(self, label_tag=None, labels=None) -> list[str]:
            return []

    again, _ = leases.next_image("dan", first, {}, WithImages(Labelled(), double.awaiting_second("dan")))
    assert again["id"] == image
    assert WithImages(Labelled(), double.awaiting_second("ada")).get_unlabeled_images() == []


def test_a_round_learns_from_approved_labels_only(team):
    store, _, reviews, provenance = team

    class Folder:
        def __init__(self, images):
            self.images = images

        def datalist(self, full_path=True):
            return [
                {"image": f"/x/{i}.nii.gz", "label": f"/y/{i}.nii.gz", "image_id": i, "label_key": i}
                for i in self.images
            ]

    approved, _ = _save(provenance, reviews, "a", "ada")
    reviews.act(approved, "rita", "approve", "", None, False)
    _save(provenance, reviews, "b", "ada")  # submitted
    returned, _ = _save(provenance, reviews, "c", "ada")
    reviews.act(returned, "rita", "return", "redo", None, False)
    folder = Folder(["a", "b", "c", "d"])  # d: saved outside this server
    on_approved = ReviewedLabels(folder, reviews, "approved")
    assert [i["image_id"] for i in on_approved.datalist()] == ["a"]
    assert on_approved.states == {"a": "approved", "b": "submitted", "c": "returned", "d": "unreviewed"}
    on_final = ReviewedLabels(folder, reviews, "final")
    assert [i["image_id"] for i in on_final.datalist()] == ["a", "b", "c", "d"]
    # a double reading waiting for adjudication is not a label yet, whatever train_on says
    image = _image(0.5, True)
    _save(provenance, reviews, image, "ada", reading=True)
    assert [i["image_id"] for i in ReviewedLabels(Folder([image]), reviews, "final").datalist()] == []


def test_labels_saved_before_reviews_existed_are_submitted_once(team_db):
    store = open_store(team_db)
    provenance = Provenance(store)
    old = provenance.record_save("img", "ada", "final", "base", [{"value": 1, "name": "liver"}], None)
    newer = provenance.record_save("img", "bob", "final", "base", [{"value": 1, "name": "liver"}], None)
    provenance.record_save("other", "ada", "draft", "base", [], None)
    reviews = Reviews(store)
    assert [r["version"] for r in reviews.pending()] == [newer] and reviews.of(old) is None
    Reviews(store)  # opened again: nothing added twice
    assert [r["version"] for r in reviews.pending()] == [newer]

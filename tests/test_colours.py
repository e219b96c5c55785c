"""Label colours (lib/labels/colours.py), the team's configured categories (--conf categories, what
/info offers the panels), and the SEGs that carry both the colours and a description that tells
versions apart (issue 21)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import write_series

from archive import dciodvfy_errors
from conftest import ROOT
from lib.archive.index import DRAFT_PREFIX, is_draft
from lib.archive.seg import Segment, series_description, series_number, short_version, write_seg
from lib.labels.colours import HAND_PICKED, NEIGHBOURS, catalog, cielab, cielab_dicom, colour, delta_e
from lib.settings import DEFAULT_AUTO_LABELS, DEFAULT_CATEGORIES, AppSettings, ConfError
from segvol.vocabulary import Vocabulary, default_vocabulary

VOCABULARY = default_vocabulary()
INDEX = {c.name: c.index for c in VOCABULARY.categories}
WHEN = datetime(2024, 5, 1, 14, 3, 7).astimezone()


# CIELab


@pytest.mark.parametrize(
    "rgb, lab",
    [  # reference values (sRGB, D65, 2° observer)
        ((255, 255, 255), (100.0, 0.0, 0.0)),
        ((0, 0, 0), (0.0, 0.0, 0.0)),
        ((255, 0, 0), (53.24, 80.09, 67.20)),
        ((0, 255, 0), (87.73, -86.18, 83.18)),
        ((0, 0, 255), (32.30, 79.19, -107.86)),
        ((128, 128, 128), (53.59, 0.0, 0.0)),
    ],
)
def test_cielab_of_known_colours(rgb, lab):
    assert cielab(rgb) == pytest.approx(lab, abs=0.01)


@pytest.mark.parametrize(
    "rgb, encoded",
    [  # PS3.3 C.10.7.1.1: L 0..100 -> 0..0xFFFF; a*, b* -128..127 -> 0..0xFFFF, 0 -> 0x8080
        ((255, 255, 255), (0xFFFF, 0x8080, 0x8080)),
        ((0, 0, 0), (0, 0x8080, 0x8080)),
        ((255, 0, 0), (round(53.2408 * 655.35), round(208.0925 * 257), round(195.2032 * 257))),
        ((0, 0, 255), (round(32.2970 * 655.35), round(207.1885 * 257), round(20.1398 * 257))),
    ],
)
def test_cielab_dicom_scales_as_the_standard_says(rgb, encoded):
    got = cielab_dicom(rgb)
    assert all(isinstance(v, int) and 0 <= v <= 0xFFFF for v in got)
    assert got == pytest.approx(encoded, abs=1)


def test_cielab_dicom_agrees_with_highdicom_scaling():
    """highdicom's CIELabColor (which truncates where we round) encodes the same Lab within one step."""
    import highdicom as hd

    for value in (1, 32, 62, 84, 160, 224, 250):
        rgb = colour(value)
        theirs = hd.color.CIELabColor(*cielab(rgb)).value
        assert np.abs(np.subtract(cielab_dicom(rgb), theirs)).max() <= 1


# colours


@pytest.mark.parametrize("one, other", NEIGHBOURS, ids=[f"{a}|{b}" for a, b in NEIGHBOURS])
def test_neighbours_differ_at_a_glance(one, other):
    """Structures that touch in a CT get colours a reader tells apart (CIE76 ΔE >= 20)."""
    assert one in INDEX and other in INDEX  # a renamed category would make the check vacuous
    assert delta_e(colour(INDEX[one]), colour(INDEX[other])) >= 20


def test_the_default_categories_and_their_neighbours_are_hand_picked():
    picked = {name for names in HAND_PICKED.values() for name in names}
    assert set(DEFAULT_CATEGORIES) <= picked
    assert {n for pair in NEIGHBOURS for n in pair} <= picked
    unknown = sorted(picked - set(INDEX))
    assert unknown == []


def test_synonymous_entries_share_their_category_colour():
    assert colour(INDEX["postcava"]) == colour(INDEX["inferior vena cava"])
    assert colour(INDEX["gall bladder"]) == colour(INDEX["gallbladder"])
    assert colour(INDEX["bladder"]) == colour(INDEX["urinary bladder"])
    assert colour(INDEX["liver"]) != colour(INDEX["right lung"]) != colour(INDEX["left lung"])


def test_every_value_has_a_colour_and_the_others_spread_out():
    values = range(1, 256)
    colours = {v: colour(v) for v in values}
    assert all(len(c) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in c) for c in colours.values())
    free = [colours[v] for v in range(224, 256)]  # outside the vocabulary: golden-angle hues
    assert min(delta_e(a, b) for a, b in zip(free, free[1:])) >= 20  # consecutive values far apart


def test_colours_are_deterministic_across_processes_and_vocabulary_objects():
    values = [1, 2, 62, 84, 97, 223, 224, 240, 255]
    mine = [colour(v) for v in values]
    assert mine == [colour(v, Vocabulary()) for v in values]
    code = f"from lib.labels.colours import colour; print([colour(v) for v in {values}])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT / "apps" / "segvol",
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": f"{ROOT / 'apps' / 'segvol'}:{ROOT}", "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == str(mine)


# the catalog the page's label search is served


def test_catalog_lists_every_category_the_configured_first():
    configured = ("spleen", "hepar", "brain", "spleen")  # a synonym and a repeat
    entries = catalog(VOCABULARY, configured)
    assert len(entries) == len(VOCABULARY) == 223
    assert sorted(e["index"] for e in entries) == list(range(1, 224))
    assert [e["name"] for e in entries[:3]] == ["spleen", "liver", "brain"]
    assert [e["configured"] for e in entries[:4]] == [True, True, True, False]
    assert sum(e["configured"] for e in entries) == 3
    rest = [e["name"].lower() for e in entries[3:]]
    assert rest == sorted(rest)
    assert all(e["colour"] == list(colour(e["index"])) for e in entries)
    assert all(VOCABULARY.categories[e["index"] - 1].name == e["name"] for e in entries)


# --conf categories


def test_the_default_categories_resolve_and_hold_the_auto_labels():
    settings = AppSettings.from_conf({}, ROOT / "model")
    assert settings.categories == DEFAULT_CATEGORIES and 16 <= len(DEFAULT_CATEGORIES) <= 20
    assert all(VOCABULARY.resolve(n).via == "name" for n in DEFAULT_CATEGORIES)  # exact vocabulary names
    assert set(DEFAULT_AUTO_LABELS) <= set(DEFAULT_CATEGORIES)  # OHIF's Auto-Segmentation asks only for these


def test_configured_categories_become_vocabulary_names_once():
    settings = AppSettings.from_conf({"categories": " hepar, Spleen ,,liver, brain "}, ROOT / "model")
    assert settings.categories == ("liver", "spleen", "brain")


def test_an_unknown_category_names_itself_with_suggestions():
    with pytest.raises(ConfError, match="--conf categories") as e:
        AppSettings.from_conf({"categories": "liver, livr, xyzzy"}, ROOT / "model")
    message = str(e.value)
    assert "'livr' (closest: liver" in message and "'xyzzy'" in message and "'liver'" not in message


def test_categories_with_no_name_are_refused():
    with pytest.raises(ConfError, match="at least one"):
        AppSettings.from_conf({"categories": " , ,"}, ROOT / "model")


def test_the_tasks_offer_the_configured_categories_and_take_every_one():
    from lib.infers.base import offered
    from lib.infers.vista3d import SegVolVista3D
    from lib.serving.host import ModelHost
    from lib.serving.params import PromptBuilder
    from lib.team.team import Team

    conf = {"weights": "seeded", "model_config": "segvol-tiny", "categories": "spleen, liver, right lung"}
    service = ModelHost(AppSettings.from_conf(conf, ROOT / "model"))
    assert list(offered(service).items()) == [("spleen", 32), ("liver", 1), ("right lung", 84)]
    task = SegVolVista3D(service, Team(0))
    assert task.info()["labels"] == {"spleen": 32, "liver": 1, "right lung": 84}
    builder = PromptBuilder(service.vocabulary, (64, 64, 16))
    (target,) = task.targets({"label_prompt": [INDEX["brain"]]}, builder)  # not offered, still served
    assert (target.name, target.value) == ("brain", INDEX["brain"])


# SEGs: colours, description, number


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    shape = (24, 24, 4)
    volume = np.linspace(-1000, 1000, np.prod(shape)).reshape(shape).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 3.0, 1.0])), folder / "ct.nii.gz")
    write_series(folder / "ct.nii.gz", folder / "dicom", "colours")
    label = np.zeros(shape, np.uint8)
    label[2:8, 2:8, 0:2] = INDEX["liver"]
    label[10:16, 2:8, 1:3] = INDEX["right lung"]
    label[2:8, 12:20, 2:4] = 230  # a name outside the vocabulary
    return folder / "dicom", label


def _segments() -> list[Segment]:
    liver, lung = (VOCABULARY.resolve(n).category for n in ("liver", "right lung"))
    return [
        Segment(INDEX["liver"], "liver", liver, "AUTOMATIC", "v"),
        Segment(INDEX["right lung"], "right lung", lung, "SEMIAUTOMATIC", "v"),
        Segment(230, "my cyst", None, "MANUAL"),
    ]


def test_each_segment_carries_its_value_colour_and_dciodvfy_agrees(series, tmp_path):
    folder, label = series
    path = write_seg(label, folder, _segments(), "base+v0003", creator="Grace Hopper", out=tmp_path / "s.dcm")
    ds = pydicom.dcmread(path)
    assert dciodvfy_errors(ds) == []
    got = {str(s.SegmentLabel): tuple(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence}
    assert got == {
        "liver": cielab_dicom(colour(INDEX["liver"])),
        "right lung": cielab_dicom(colour(INDEX["right lung"])),
        "my cyst": cielab_dicom(colour(230)),
    }
    assert len(set(got.values())) == 3


def test_versions_are_told_apart_in_the_series_list(series, tmp_path):
    folder, label = series
    segments = _segments()[:1]
    first, second = (
        pydicom.dcmread(write_seg(label, folder, segments, "base+v0002", "Grace Hopper", tmp_path / name, when=when))
        for name, when in (("1", WHEN), ("2", WHEN + timedelta(seconds=40)))
    )
    assert first.SeriesDescription == "Grace Hopper 2024-05-01 14:03:07 SegVol v0002"
    assert second.SeriesDescription == "Grace Hopper 2024-05-01 14:03:47 SegVol v0002"
    assert int(second.SeriesNumber) - int(first.SeriesNumber) == 40
    assert (first.SeriesDate, first.SeriesTime) == ("20240501", "140307")
    assert (first.ContentDate, first.ContentTime) == (first.SeriesDate, first.SeriesTime)
    assert not is_draft(first) and dciodvfy_errors(second) == []


def test_a_draft_starts_with_the_draft_prefix(series, tmp_path):
    folder, label = series
    path = write_seg(label, folder, _segments()[:1], "seeded-untrained (segvol-tiny, seed 0)", when=WHEN, draft=True)
    ds = pydicom.dcmread(path)
    assert ds.SeriesDescription == "DRAFT 2024-05-01 14:03:07 SegVol seeded-untrained" and is_draft(ds)
    assert ds.ContentLabel == "DRAFT" and dciodvfy_errors(ds) == []


@pytest.mark.parametrize(
    "creator, expected",
    [
        ("Grace Hopper", "Grace Hopper 2024-05-01 14:03:07 SegVol v0007"),
        ("x" * 300, "x" * 20 + " 2024-05-01 14:03:07 SegVol v0007"),
        ("李" * 40, "李" * 6 + " 2024-05-01 14:03:07 SegVol v0007"),  # 20 bytes: 6 whole characters
        ("", "anonymous 2024-05-01 14:03:07 SegVol v0007"),
        ("DRAFT Bob", "by DRAFT Bob 2024-05-01 14:03:07 SegVol v0007"),  # never read as a draft
        ("a\\b\x00", "a/b 2024-05-01 14:03:07 SegVol v0007"),
    ],
)
def test_series_description_keeps_the_time_within_64_bytes(creator, expected):
    text = series_description("BAAI-SegVol/model.safetensors+v0007", creator, WHEN)
    assert text == expected and len(text.encode("utf-8")) <= 64
    assert not text.startswith(DRAFT_PREFIX)


def test_a_long_version_is_cut_last():
    text = series_description("weights/" + "w" * 80 + ".pth", "Grace Hopper", WHEN)
    assert text.startswith("Grace Hopper 2024-05-01 14:03:07 SegVol weights/ww") and len(text) == 64


@pytest.mark.parametrize(
    "version, short",
    [
        ("seeded-untrained (segvol-tiny, seed 0)", "seeded-untrained"),
        ("BAAI-SegVol/model.safetensors", "BAAI-SegVol/model.safetensors"),
        ("BAAI-SegVol/model.safetensors+v0012", "v0012"),
        ("v1", "v1"),
    ],
)
def test_short_version(version, short):
    assert short_version(version) == short


def test_series_number_grows_and_stays_a_valid_is():
    assert series_number(WHEN + timedelta(seconds=1)) == series_number(WHEN) + 1
    assert 0 < series_number(WHEN) < series_number(datetime(2088, 1, 1).astimezone()) < 2**31

"""Client strings become valid DICOM values (lib.archive.dicom_text), and the SEGs written with them pass
dciodvfy and read back as exactly those values (issue 19: SEGs a validator rejects were stored)."""

from __future__ import annotations

from datetime import datetime

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import write_series  # noqa: E402

from archive import dciodvfy_errors
from lib.archive.dicom_text import character_set, long_string, person_name
from lib.archive.seg import Segment, read_seg, series_description, write_seg

GREEK = "Αθηνά Παπαδοπούλου"
ZOE = "Zoë Ōtsuka 李雷"
SHAPE = (32, 32, 4)


# person_name


@pytest.mark.parametrize(
    "client, expected",
    [
        ("Jane Doe", "Doe^Jane"),
        ("  Jane \t Mary   Doe ", "Doe^Jane Mary"),
        ("grace", "grace^"),
        ("Doe^Jane", "Doe^Jane"),
        ("^Jane", "^Jane"),
        ("A^B^C^D^E^F", "A^B^C^D^E F"),
        ("A^B^C^D^E^F^G", "A^B^C^D^E F G"),
        ("A^B^C^D^^^G^", "A^B^C^D^G"),
        ("Doe^Jane^^^", "Doe^Jane"),
        ("Doe ^  Jane  ", "Doe^Jane"),
        ("DOMAIN\\jane", "DOMAIN/jane^"),
        ("Doe^Jane=ドウ^ジェーン", "Doe^Jane-ドウ^ジェーン"),
        ("a=b", "a-b^"),
        ("bo\x00ne\x1b[31m", "bone[31m^"),
        ("Jane\nDoe", "Doe^Jane"),
        ("\x7fJa\x9bne\x1f Doe", "Doe^Jane"),
        ("ok\ud800", "ok^"),
        (ZOE, "李雷^Zoë Ōtsuka"),
        (GREEK, "Παπαδοπούλου^Αθηνά"),
        ("Zoe\u0308", "Zoë^"),  # NFC
        ("x" * 300, "x" * 63 + "^"),
        ("李" * 200, "李" * 21 + "^"),  # 64 bytes in UTF-8
        ("Doe^" + "ë" * 100, "Doe^" + "ë" * 30),
        ("y" * 100 + " z", "z^" + "y" * 62),
        ("Doe^" + "j" * 100, "Doe^" + "j" * 60),
        ("^".join(["abcdefghijklmnopqrstu"] * 5), "abcdefghijklmnopqrstu^abcdefghijklmnopqrstu^abcdefghijklmnopqrst"),
        ("", "anonymous^"),
        ("^^^", "anonymous^"),
        ("\x00\x1b\n", "anonymous^"),
        ("=", "-^"),
    ],
)
def test_person_name(client, expected):
    name = person_name(client)
    assert name == expected
    assert len(name.encode("utf-8")) <= 64 and "\\" not in name and "=" not in name and name.count("^") in range(1, 5)
    assert all(c.isprintable() for c in name)


def test_person_name_is_no_longer_in_identity():
    import lib.team.identity

    assert not hasattr(lib.team.identity, "person_name")


# long_string


@pytest.mark.parametrize(
    "text, expected",
    [
        ("liver", "liver"),
        ("  left   kidney ", "left kidney"),
        ("liver\\spleen", "liver/spleen"),
        ("a\\b\\c", "a/b/c"),
        ("bo\x00ne\x1b[31m", "bone[31m"),
        ("two\nlines\r\n\tand a tab", "two lines and a tab"),
        ("x" * 300, "x" * 64),
        ("abc " * 20, ("abc " * 16).rstrip()),  # cut after a space: no trailing space
        ("A^B^C^D^E^F^G", "A^B^C^D^E^F^G"),  # '^' and '=' are plain text in LO
        ("a=b", "a=b"),
        (ZOE, ZOE),
        (GREEK, GREEK),
        ("肝" * 100, "肝" * 21),  # 63 bytes: a 22nd would need 66
        ("ë" * 100, "ë" * 32),
        ("Zoe\u0308", "Zoë"),
        ("\ud800liver", "liver"),
        ("", "unnamed"),
        ("  \x00\x1b\n ", "unnamed"),
    ],
)
def test_long_string(text, expected):
    value = long_string(text)
    assert value == expected
    assert 0 < len(value.encode("utf-8")) <= 64 and "\\" not in value and value == value.strip()
    assert all(c.isprintable() for c in value)


def test_long_string_falls_back_to_the_callers_value_cleaned():
    assert long_string("\x00 \n", "segment 3") == "segment 3"
    assert long_string("", "fall\\back") == "fall/back"
    assert long_string("", "\x00") == "unnamed"
    assert long_string("", "z" * 100) == "z" * 64


# character_set


def test_character_set():
    assert character_set() is None
    assert character_set("Doe^Jane", "liver", "A^B=C") is None
    assert character_set("Doe^Jane", "Zoë^") == "ISO_IR 192"
    assert character_set(GREEK) == "ISO_IR 192"
    assert character_set("李雷") == "ISO_IR 192"
    assert character_set("", "\x7f") is None


# end to end: SEGs over a small CT series, checked by dciodvfy and read back with pydicom


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 32x32x4 CT series (scripts/dicom_series.py) and a label with one box."""
    folder = tmp_path_factory.mktemp("ct")
    volume = np.linspace(-1000, 1000, np.prod(SHAPE)).reshape(SHAPE).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 3.0, 1.0])), folder / "ct.nii.gz")
    files = write_series(folder / "ct.nii.gz", folder / "dicom", "hostile")
    label = np.zeros(SHAPE, np.uint8)
    label[8:20, 10:24, 1:3] = 1
    return folder / "dicom", files, label


HOSTILE = [
    # client string, ContentCreatorName, SegmentLabel (= the local code's CodeMeaning)
    ("A^B^C^D^E^F^G", "A^B^C^D^E F G", "A^B^C^D^E^F^G"),
    (ZOE, "李雷^Zoë Ōtsuka", ZOE),
    (GREEK, "Παπαδοπούλου^Αθηνά", GREEK),
    ("liver\\spleen", "liver/spleen^", "liver/spleen"),
    ("bo\x00ne\x1b[31m", "bone[31m^", "bone[31m"),
    ("x" * 300, "x" * 63 + "^", "x" * 64),
    ("李" * 200, "李" * 21 + "^", "李" * 21),
    ("Doe^Jane=ドウ^ジェーン", "Doe^Jane-ドウ^ジェーン", "Doe^Jane=ドウ^ジェーン"),
    ("\x00\n\x1b", "anonymous^", "segment 1"),
]


@pytest.mark.parametrize("client, creator, label", HOSTILE, ids=[ascii(h[0])[:24] for h in HOSTILE])
def test_a_seg_with_hostile_strings_passes_dciodvfy_and_reads_back_clean(series, tmp_path, client, creator, label):
    from segvol.vocabulary import default_vocabulary

    folder, _, label_ijk = series
    segment = Segment(1, client, None, "SEMIAUTOMATIC", model_version=f"v\\1{client}")
    when = datetime(2024, 5, 1, 14, 3, 7).astimezone()
    path = write_seg(label_ijk, folder, [segment], "v1", creator=client, out=tmp_path / "seg.dcm", when=when)
    ds = pydicom.dcmread(path)
    assert dciodvfy_errors(ds) == []
    assert str(ds.ContentCreatorName) == creator
    (item,) = ds.SegmentSequence
    assert item.SegmentLabel == label and item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == label
    assert item.SegmentAlgorithmName == "SegVol"
    assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == long_string(f"v\\1{client}")
    # the annotator first (cut short), then the time and the version, whatever the name
    assert ds.SeriesDescription == series_description("v1", client, when)
    assert ds.SeriesDescription.endswith(" 2024-05-01 14:03:07 SegVol v1") and len(ds.SeriesDescription.encode()) <= 64
    texts = [creator, label, ds.SeriesDescription]
    assert ds.get("SpecificCharacterSet") == ("ISO_IR 192" if any(not t.isascii() for t in texts) else None)
    # the bytes on disk are UTF-8 where the text is not ASCII
    raw = path.read_bytes()
    assert creator.encode("utf-8") in raw and label.encode("utf-8") in raw
    # and our reader gets the label back under the cleaned name
    labels, names = read_seg(path, _ct(folder), default_vocabulary())
    assert names == {1: label} and (labels == label_ijk).all()


def test_an_ascii_seg_says_no_character_set(series, tmp_path):
    folder, _, label_ijk = series
    path = write_seg(
        label_ijk, folder, [Segment(1, "liver", None, "MANUAL")], "v1", creator="Jane Doe", out=tmp_path / "a.dcm"
    )
    ds = pydicom.dcmread(path)
    assert "SpecificCharacterSet" not in ds and str(ds.ContentCreatorName) == "Doe^Jane"
    assert dciodvfy_errors(ds) == []


def test_a_ct_in_latin1_gives_a_utf8_seg_with_the_patient_name_intact(series, tmp_path):
    """highdicom copies the patient's name from the CT but not its SpecificCharacterSet."""
    _, files, label_ijk = series
    folder = tmp_path / "latin1"
    folder.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Jürgen"
        ds.save_as(folder / f.name)
    assert "Müller".encode("latin-1") in (folder / files[0].name).read_bytes()
    path = write_seg(
        label_ijk, folder, [Segment(1, "liver", None, "MANUAL")], "v1", creator="grace", out=tmp_path / "s.dcm"
    )
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Müller^Jürgen"
    assert str(ds.ContentCreatorName) == "grace^" and dciodvfy_errors(ds) == []


def _ct(folder):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()

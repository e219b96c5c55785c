"""Uploaded volumes are read by content, self-contained only, and bounded before anything is inflated
(issue 19: a detached NRRD header read a file outside the datastore; a small .nii.gz inflated 580 MB)."""

from __future__ import annotations

import gc
import gzip
import io
import resource
import sys
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from conftest import phantom
from lib.labels.checks import LabelError, read_upload
from lib.labels.uploads import UploadError, UploadTooLarge, check_image, read_label
from segvol.io import read_volume

SHAPE = (48, 40, 12)
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 5.0, 30.0], [0.0, 0.0, 0.0, 1.0]])
GiB = 1 << 30
MB = 1_000_000

_opened: list[str] | None = None  # paths opened while a test watches (audit hook, set once per process)


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], str | bytes | Path):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(phantom(SHAPE), AFFINE), str(path))
    return read_volume(path)


@pytest.fixture
def label():
    ct = phantom(SHAPE)
    return ((ct > 80).astype(np.uint8) + (ct > 110)).astype(np.uint8)


def measured(fn):
    """Run ``fn``; its exception (or None), tracemalloc's peak and the growth of the process's
    peak RSS, in bytes."""
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        fn()
        error = None
    except Exception as e:  # noqa: BLE001 - returned to the test to check
        error = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    print(f"\n{getattr(fn, '__name__', fn)}: tracemalloc peak {peak / MB:.2f} MB, ru_maxrss growth {rss / MB:.2f} MB")
    return error, peak, rss


def gzip_zeros(nbytes: int, prefix: bytes = b"") -> bytes:
    """``prefix`` then ``nbytes`` zero bytes, gzip-compressed in chunks (never all in memory)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(prefix)]
    chunk = bytes(1 << 20)
    for start in range(0, nbytes, len(chunk)):
        out.append(c.compress(chunk[: min(len(chunk), nbytes - start)]))
    out.append(c.flush())
    return b"".join(out)


# --- references to other files: never followed -------------------------------------------------


DETACHED = [
    "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 48 40 12\nencoding: raw\ndata file: {secret}\n",
    "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 48 40 12\nspace: left-posterior-superior\n"
    "space directions: (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\ndatafile: {secret}\n\n",
    "NRRD0005\ntype: uchar\ndimension: 3\nsizes: 48 40 12\nencoding: raw\nData File: LIST\n{secret}\n",
]


@pytest.mark.parametrize("name", ["x.nhdr", "label.nrrd", "label.nii.gz", "label.bin", "label"])
@pytest.mark.parametrize("text", DETACHED)
def test_a_detached_nrrd_header_is_refused_whatever_its_name_and_the_file_it_names_is_never_opened(
    tmp_path, image, name, text
):
    global _opened
    secret = tmp_path / "outside" / "secret.raw"
    secret.parent.mkdir()
    secret_bytes = (b"TOP-SECRET-" * 3000)[: np.prod(SHAPE)]  # exactly the image's voxel count
    secret.write_bytes(secret_bytes)
    upload = tmp_path / "uploads" / name
    upload.parent.mkdir()
    upload.write_text(text.format(secret=secret))
    _opened = []
    try:
        with pytest.raises(UploadError, match=r"detached NRRD headers \(data file: .*\) are not accepted") as e:
            read_label(upload, image, GiB)
        with pytest.raises(UploadError, match="detached NRRD headers"):
            check_image(upload, GiB)
        with pytest.raises(UploadError, match="detached NRRD headers"):
            read_upload(upload, image)
        opened = list(_opened)
    finally:
        _opened = None
    assert str(secret) not in opened and all("secret" not in p for p in opened)
    assert set(opened) == {str(upload)}
    assert b"TOP-SECRET" not in str(e.value).encode() and "TOP-SECRET" not in repr(e.value.args)


def test_a_nifti_pair_is_refused_and_its_img_never_opened(tmp_path, image, label):
    global _opened
    nib.save(nib.Nifti1Pair(label, AFFINE), str(tmp_path / "pair.hdr"))
    assert (tmp_path / "pair.img").is_file()
    for name in ("pair.hdr", "pair.nii"):
        if name != "pair.hdr":
            (tmp_path / name).write_bytes((tmp_path / "pair.hdr").read_bytes())
        _opened = []
        try:
            with pytest.raises(UploadError, match=r"NIfTI-1 pair header \(.hdr/.img\) is not accepted"):
                read_label(tmp_path / name, image, GiB)
            with pytest.raises(UploadError, match="pair header"):
                check_image(tmp_path / name, GiB)
            opened = list(_opened)
        finally:
            _opened = None
        assert opened == [str(tmp_path / name)] * 2


# --- sizes bounded before anything is inflated ---------------------------------------------------


def test_a_small_gzip_nifti_declaring_a_huge_shape_is_refused_before_inflating(tmp_path, image):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 300))
    hdr.set_data_dtype(np.uint8)
    hdr.set_qform(AFFINE, 1)
    hdr["vox_offset"] = 352
    block = hdr.binaryblock + b"\0\0\0\0"
    path = tmp_path / "label.nii.gz"
    path.write_bytes(gzip_zeros(1000 * 1000 * 300, block))
    size = path.stat().st_size
    assert size < 400_000  # about 300 kB on the wire, 300 MB declared

    def read_label_huge():
        read_label(path, image, GiB)

    error, peak, rss = measured(read_label_huge)
    assert isinstance(error, UploadError) and not isinstance(error, UploadTooLarge)
    assert "label shape (1000, 1000, 300) differs from the image shape (48, 40, 12)" in str(error)
    assert peak < 50 * MB and rss < 50 * MB

    def check_image_huge():
        check_image(path, 100 * MB)

    error, peak, rss = measured(check_image_huge)
    assert isinstance(error, UploadTooLarge)
    assert "300000000 bytes of voxel data" in str(error) and "100000000 bytes" in str(error)
    assert "--conf max_upload_mb" in str(error)
    assert peak < 50 * MB and rss < 50 * MB


def test_a_gzip_bomb_nrrd_is_refused_by_its_data_length_in_bounded_memory(tmp_path, image):
    header = (
        b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 48 40 12\nspace: left-posterior-superior\n"
        b"space directions: (-1.5,0,0) (0,-1.5,0) (0,0,5)\nendian: little\nencoding: gzip\n\n"
    )
    path = tmp_path / "label.seg.nrrd"
    path.write_bytes(header + gzip_zeros(256 * 1 << 20))
    assert path.stat().st_size < 400_000

    def read_label_bomb():
        read_label(path, image, GiB)

    error, peak, rss = measured(read_label_bomb)
    assert isinstance(error, UploadError)
    assert "the NRRD data is longer than its header declares (23040 bytes, shape (48, 40, 12), uint8)" in str(error)
    assert peak < 50 * MB and rss < 50 * MB

    def check_image_bomb():
        check_image(path, GiB)

    error, peak, rss = measured(check_image_bomb)
    assert isinstance(error, UploadError) and "longer than its header declares" in str(error)
    assert peak < 50 * MB and rss < 50 * MB


def test_an_upload_larger_than_the_bound_is_too_large(tmp_path, image, label):
    path = tmp_path / "label.nii"
    nib.save(nib.Nifti1Image(label, AFFINE), str(path))
    size = path.stat().st_size
    for call in (lambda: read_label(path, image, size - 1), lambda: check_image(path, size - 1)):
        with pytest.raises(UploadTooLarge) as e:
            call()
        assert f"the upload is {size} bytes" in str(e.value) and f"bound of {size - 1} bytes" in str(e.value)
        assert "--conf max_upload_mb" in str(e.value)
    with pytest.raises(UploadTooLarge):
        read_upload(path, image, max_bytes=size - 1)
    assert read_label(path, image, size).array.shape == SHAPE


def test_declared_data_beyond_the_bound_is_too_large_even_when_the_file_is_small(tmp_path, image):
    path = tmp_path / "label.nii.gz"
    big = np.zeros(SHAPE, np.float64)
    nib.save(nib.Nifti1Image(big, AFFINE), str(path))
    assert path.stat().st_size < 10_000 < big.nbytes
    with pytest.raises(UploadTooLarge, match=f"declares {big.nbytes} bytes of voxel data"):
        read_label(path, image, 10_000)


# --- broken files: an UploadError naming the problem, never another exception -------------------------


def test_a_truncated_or_corrupt_nifti_is_an_upload_error(tmp_path, image, label):
    good = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, AFFINE), str(good))
    data = good.read_bytes()
    cases = {
        "half.nii.gz": (data[: len(data) // 2], "truncated"),
        "header-only.nii.gz": (data[:60], "truncated|ends inside"),
        "corrupt.nii.gz": (data[:200] + bytes(b ^ 0x5A for b in data[200:400]) + data[400:], "corrupt"),
        "no-crc.nii.gz": (data[:-8], "truncated"),
        "junk-after.nii.gz": (data + b"junk", "stray bytes"),
    }
    plain = tmp_path / "label.nii"
    nib.save(nib.Nifti1Image(label, AFFINE), str(plain))
    raw = plain.read_bytes()
    cases["short.nii"] = (raw[:-100], r"shorter than its header declares: 22940 bytes after the header, 23040")
    cases["long.nii"] = (raw + b"\0" * 7, "longer than its header declares: 23047 bytes")
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UploadError, match=message):
            read_label(tmp_path / name, image, GiB)
        with pytest.raises(UploadError, match=message):
            check_image(tmp_path / name, GiB)
    (tmp_path / "padded.nii.gz").write_bytes(data + b"\0" * 10)  # gzip allows zero padding
    assert np.array_equal(read_label(tmp_path / "padded.nii.gz", image, GiB).array, label)
    whole = gzip.decompress(data)  # several gzip members, as `cat a.gz b.gz` makes, are one file
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(whole[:1000]) + gzip.compress(whole[1000:]))
    assert np.array_equal(read_label(tmp_path / "members.nii.gz", image, GiB).array, label)


def test_odd_headers_are_refused_with_their_reason(tmp_path, image, label):
    def nrrd_file(name, fields, data=bytes(23040)):
        text = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n"
        (tmp_path / name).write_bytes(text.encode() + data)
        return tmp_path / name

    base = {
        "type": "uchar",
        "dimension": 3,
        "sizes": "48 40 12",
        "space": "left-posterior-superior",
        "space directions": "(-1.5,0,0) (0,-1.5,0) (0,0,5)",
        "encoding": "raw",
    }
    cases = [
        ({"encoding": "ascii"}, "NRRD encoding 'ascii' is not accepted"),
        ({"encoding": "bzip2"}, "NRRD encoding 'bzip2' is not accepted"),
        ({"type": "block"}, "NRRD type 'block' is not accepted"),
        ({"type": "short"}, "NRRD endian None"),
        ({"dimension": 4, "sizes": "2 48 40 12"}, "NRRD dimension 4: a 3D volume is required .*seg.nrrd"),
        ({"space": "scanner-xyz"}, "NRRD space 'scanner-xyz' is not accepted"),
        ({"space directions": "(1,0,0) (2,0,0) (0,0,1)"}, "space directions must be 3 finite, independent"),
        ({"byte skip": -1}, "NRRD 'byte skip' is not accepted"),
        ({"sizes": "48 40 13"}, r"label shape \(48, 40, 13\) differs from the image shape \(48, 40, 12\)"),
    ]
    for i, (change, message) in enumerate(cases):
        path = nrrd_file(f"odd{i}.nrrd", {**base, **change})
        with pytest.raises(UploadError, match=message):
            read_label(path, image, GiB)
    (tmp_path / "nohdr.nrrd").write_bytes(b"NRRD0004\ntype: uchar\n" + b"x" * 100)
    with pytest.raises(UploadError, match="no blank line"):
        read_label(tmp_path / "nohdr.nrrd", image, GiB)

    nib.save(nib.Nifti1Image(label[..., None], AFFINE), str(tmp_path / "4d1.nii.gz"))  # a 4th dim of 1 is fine
    assert read_label(tmp_path / "4d1.nii.gz", image, GiB).array.shape == SHAPE
    assert check_image(tmp_path / "4d1.nii.gz", GiB) == ".nii.gz"
    nib.save(nib.Nifti1Image(np.stack([label, label], -1), AFFINE), str(tmp_path / "4d2.nii.gz"))
    for call in (read_label, lambda p, *_: check_image(p, GiB)):
        with pytest.raises(UploadError, match=r"dimensions \(48, 40, 12, 2\): a 3D volume is required"):
            call(tmp_path / "4d2.nii.gz", image, GiB)
    far = nib.Nifti1Image(label, AFFINE)
    far.header["vox_offset"] = 4 << 20
    (tmp_path / "far.nii").write_bytes(far.header.binaryblock + b"\0" * 4 + label.tobytes(order="F"))
    with pytest.raises(UploadError, match="vox_offset 4194304"):
        read_label(tmp_path / "far.nii", image, GiB)
    rgb = nib.Nifti1Image(np.zeros(SHAPE, [("R", "u1"), ("G", "u1"), ("B", "u1")]), AFFINE)
    nib.save(rgb, str(tmp_path / "rgb.nii"))
    with pytest.raises(UploadError, match="data type .* is not accepted"):
        read_label(tmp_path / "rgb.nii", image, GiB)
    (tmp_path / "nrrd.gz").write_bytes(gzip.compress(nrrd_file("inner.nrrd", base).read_bytes()))
    with pytest.raises(UploadError, match="gzip-compressed upload must hold a NIfTI"):
        read_label(tmp_path / "nrrd.gz", image, GiB)
    dicom = tmp_path / "x.dcm"
    dicom.write_bytes(b"\0" * 128 + b"DICM\x02\x00" + b"\0" * 100)
    with pytest.raises(UploadError, match="a DICOM file is not accepted here"):
        read_label(dicom, image, GiB)
    for content in (b"", b"not a volume", b"\0" * 10):
        (tmp_path / "junk.nii.gz").write_bytes(content)
        with pytest.raises(UploadError, match="the label is not a readable volume"):
            read_label(tmp_path / "junk.nii.gz", image, GiB)
        with pytest.raises(UploadError, match="the image is not a readable volume"):
            check_image(tmp_path / "junk.nii.gz", GiB)


# --- valid files read back voxel for voxel on the right grid --------------------------------------


def assert_same_as_read_volume(path: Path, image, label) -> None:
    got = read_label(path, image, GiB)
    ref = read_volume(path)
    assert got.kind == ref.kind and got.array.shape == SHAPE
    assert got.array.dtype == ref.array.dtype.newbyteorder("=")
    assert np.array_equal(got.array, ref.array) and np.array_equal(got.array, label)
    assert np.allclose(got.affine, ref.affine, atol=1e-6) and np.allclose(got.affine, image.affine, atol=1e-4)


@pytest.mark.parametrize("name", ["label.nii", "label.nii.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_a_nifti_written_by_nibabel_reads_back(tmp_path, image, label, name, dtype):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(label.astype(dtype), AFFINE), str(path))
    assert_same_as_read_volume(path, image, label)
    assert check_image(path, GiB) == (".nii.gz" if name.endswith(".gz") else ".nii")
    assert np.array_equal(read_upload(path, image), label)


def test_nifti2_big_endian_and_scaled_nifti_read_back(tmp_path, image, label):
    nib.save(nib.Nifti2Image(label, AFFINE), str(tmp_path / "n2.nii.gz"))
    assert_same_as_read_volume(tmp_path / "n2.nii.gz", image, label)
    big = nib.Nifti1Image(label.astype(">i2"), AFFINE, header=nib.Nifti1Header(endianness=">"))
    (tmp_path / "big.nii").write_bytes(big.to_bytes())
    assert read_volume(tmp_path / "big.nii").header.header.endianness == ">"
    assert_same_as_read_volume(tmp_path / "big.nii", image, label)
    scaled = nib.Nifti1Image(label.astype(np.int16), AFFINE)
    scaled.header.set_data_dtype(np.int16)
    data = scaled.to_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(data))
    hdr.set_slope_inter(2.0, 1.0)
    (tmp_path / "scaled.nii").write_bytes(hdr.binaryblock + data[348:])
    got, ref = read_label(tmp_path / "scaled.nii", image, GiB), read_volume(tmp_path / "scaled.nii")
    assert np.array_equal(got.array, ref.array) and np.array_equal(got.array, label * 2.0 + 1)


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
@pytest.mark.parametrize("space", ["right-anterior-superior", "left-posterior-superior"])
@pytest.mark.parametrize("dtype", ["u1", "<i2", ">u2", "<f8"])
def test_an_nrrd_written_by_pynrrd_reads_back(tmp_path, image, label, encoding, space, dtype):
    aff = AFFINE if space.startswith("right") else np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE
    path = tmp_path / "label.nrrd"
    header = {"space": space, "space directions": aff[:3, :3].T, "space origin": aff[:3, 3], "encoding": encoding}
    nrrd.write(str(path), label.astype(dtype), header)
    assert_same_as_read_volume(path, image, label)
    assert check_image(path, GiB) == ".nrrd"
    assert np.array_equal(read_upload(path, image), label)


def test_a_raw_labelmap_reads_back_on_the_image_grid(tmp_path, image, label):
    path = tmp_path / "label.bin"
    path.write_bytes(label.tobytes(order="F"))
    got = read_label(path, image, GiB)
    assert got.array.shape == SHAPE and np.array_equal(got.array, label)
    assert got.kind == image.kind and np.array_equal(got.affine, image.affine)
    assert np.array_equal(read_upload(path, image), label)
    with pytest.raises(UploadError, match="not a readable volume"):
        read_label(path, image, GiB, raw_ok=False)
    path.write_bytes(label.tobytes(order="F")[:-1])
    with pytest.raises(UploadError, match=r"nor a raw labelmap \(it has 23039 bytes; the image has 23040 voxels"):
        read_label(path, image, GiB)
    with pytest.raises(UploadError, match="image is not a readable volume"):
        check_image(path, GiB)


def test_content_decides_a_nifti_named_bin_is_read_as_nifti(tmp_path, image, label):
    path = tmp_path / "label.bin"
    nib.save(nib.Nifti1Image(label, AFFINE), str(tmp_path / "label.nii.gz"))
    path.write_bytes((tmp_path / "label.nii.gz").read_bytes())
    got = read_label(path, image, GiB)
    assert got.kind == "nifti" and np.array_equal(got.array, label) and np.allclose(got.affine, AFFINE)
    assert np.array_equal(read_upload(path, image), label)
    assert check_image(path, GiB) == ".nii.gz"
    nrrd.write(str(tmp_path / "x.nrrd"), label, {"space": "RAS", "space directions": AFFINE[:3, :3].T})
    (tmp_path / "x.nii.gz").write_bytes((tmp_path / "x.nrrd").read_bytes())
    assert check_image(tmp_path / "x.nii.gz", GiB) == ".nrrd"


# --- read_upload: the label checks after reading -------------------------------------------------------


def test_read_upload_keeps_its_label_checks_and_lets_upload_errors_through(tmp_path, image, label):
    shifted = AFFINE.copy()
    shifted[0, 3] += 2
    nib.save(nib.Nifti1Image(label, shifted), str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(LabelError, match="the label's grid differs from the image's"):
        read_upload(tmp_path / "shifted.nii.gz", image)
    nib.save(nib.Nifti1Image(label + np.float32(0.5), AFFINE), str(tmp_path / "half.nii.gz"))
    with pytest.raises(LabelError, match="whole numbers"):
        read_upload(tmp_path / "half.nii.gz", image)
    nib.save(nib.Nifti1Image(label.astype(np.int32) - 1, AFFINE), str(tmp_path / "neg.nii.gz"))
    with pytest.raises(LabelError, match=r"0\.\.65535"):
        read_upload(tmp_path / "neg.nii.gz", image)
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(tmp_path / "small.nii.gz"))
    with pytest.raises(UploadError, match="differs from the image shape") as e:
        read_upload(tmp_path / "small.nii.gz", image)
    assert not isinstance(e.value, LabelError)


# --- DICOM Part 10 files of a session upload -------------------------------------------------------------

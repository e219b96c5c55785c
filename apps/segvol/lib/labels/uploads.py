"""Reading untrusted uploaded volume files safely.

An upload's format is decided by its content, never by its file name, and only self-contained
files are read: a NIfTI-1/NIfTI-2 single file (plain or gzip) or an NRRD with its data attached
(raw or gzip encoding). Nothing here ever opens a path named inside an upload (a detached NRRD
header's ``data file``, a NIfTI pair's ``.img``), and nothing is inflated before the header's
declared shape, type and data size have been checked: decompression never produces more than
the header plus the declared data (and one byte to see that the data ends there).
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from segvol.io import Volume

MiB = 1 << 20
MAX_HEADER_BYTES = MiB  # a NIfTI vox_offset (header + extensions) or an NRRD text header
CHUNK = MiB  # compressed bytes read, and inflated bytes asked for, at a time
LIMIT_HINT = "--conf max_upload_mb"

GZIP_MAGIC = b"\x1f\x8b"
NRRD_MAGIC = b"NRRD000"
NIFTI1_SIZES = {b"\x5c\x01\x00\x00": "<", b"\x00\x00\x01\x5c": ">"}  # sizeof_hdr 348
NIFTI2_SIZES = {b"\x1c\x02\x00\x00": "<", b"\x00\x00\x02\x1c": ">"}  # sizeof_hdr 540
ACCEPTED = "a single-file NIfTI-1/NIfTI-2 (.nii, .nii.gz) or an NRRD with its data in the same file (.nrrd)"

# NRRD type names (teem's list) -> numpy type without byte order
NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(
        ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
        "i8",
    ),
    **dict.fromkeys(
        ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
        "u8",
    ),
    "float": "f4",
    "double": "f8",
}
NRRD_SPACES = ("left-posterior-superior", "lps", "right-anterior-superior", "ras")  # what Volume.affine knows


class UploadError(ValueError):
    """An upload that is not read; the message names the problem (an HTTP 400 for the client)."""


class UploadTooLarge(UploadError):
    """An upload, or the data its header declares, beyond the size bound (an HTTP 413)."""


@dataclass
class _Layout:
    """What a header declares, known before any voxel is read."""

    kind: str  # "nifti" or "nrrd"
    shape: tuple[int, ...]  # 3D, Fortran (i, j, k) order as stored
    dtype: np.dtype  # with the file's byte order
    header: object  # nibabel header or pynrrd's header dict
    ext: str  # ".nii.gz", ".nii" or ".nrrd": what the bytes are, whatever the upload was called
    known_length: int | None = None  # bytes after the header in an uncompressed file, to check up front

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"shape {self.shape}, {self.dtype.name}"


class _Stream:
    """An upload's bytes, inflated on the fly when compressed, and never more than asked for:
    a gzip bomb costs the bytes the header declared and no more."""

    def __init__(self, source: Callable[[int], bytes], wbits: int | None = None):
        self._source = source
        self._wbits = wbits
        self._pushed = b""  # bytes read ahead and given back
        self._pending = b""  # compressed bytes of a next gzip member
        self._inflate = zlib.decompressobj(wbits) if wbits else None
        self.delivered = 0  # bytes handed out (less those given back): the offset in the stream

    def unread(self, data: bytes) -> None:
        self._pushed = data + self._pushed
        self.delivered -= len(data)

    def _next(self, want: int) -> bytes:
        """Up to ``want`` (> 0) bytes; b"" only at the end."""
        out = self._produce(want)
        self.delivered += len(out)
        return out

    def _produce(self, want: int) -> bytes:
        if self._pushed:
            out, self._pushed = self._pushed[:want], self._pushed[want:]
            return out
        want = min(want, CHUNK)
        if self._inflate is None:
            return self._source(want)
        while True:
            d = self._inflate
            if d.eof:
                rest = d.unused_data
                while True:  # zero padding may follow, or another gzip member (as gzip allows)
                    rest = rest.lstrip(b"\0")
                    if len(rest) >= 2:
                        break
                    more = self._source(CHUNK)
                    if not more:
                        if rest:
                            raise UploadError("the upload has stray bytes after its compressed data")
                        return b""
                    rest += more
                if not rest.startswith(GZIP_MAGIC):
                    raise UploadError("the upload has stray bytes after its compressed data")
                self._inflate, self._pending = zlib.decompressobj(self._wbits), rest
                continue
            data = d.unconsumed_tail or self._pending or self._source(CHUNK)
            self._pending = b""
            try:
                out = d.decompress(data, want)
            except zlib.error as e:
                raise UploadError(f"the compressed data is corrupt ({e})") from e
            if out:
                return out
            if not data and not d.eof:
                raise UploadError("the compressed data is truncated (the upload ends inside it)")

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, fewer only at the end."""
        parts = []
        while n > 0:
            part = self._next(n)
            if not part:
                break
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise UploadError(f"the upload ends inside its {what} ({len(data)} of {n} bytes)")
        return data

    def fill(self, out: memoryview | None, n: int) -> int:
        """Read up to ``n`` bytes into ``out`` (or discard them when None); how many came."""
        got = 0
        while got < n:
            part = self._next(n - got)
            if not part:
                break
            if out is not None:
                out[got : got + len(part)] = part
            got += len(part)
        return got


def _open(path: str | Path, max_bytes: int) -> tuple[io.BufferedReader, int]:
    """The upload, opened once; its size bounded before a byte is read."""
    try:
        f = open(path, "rb")  # the caller closes it
    except OSError as e:
        raise UploadError(f"the upload cannot be opened ({e.strerror})") from e
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise UploadError("the upload is not a regular file")
    if st.st_size > max_bytes:
        f.close()
        raise UploadTooLarge(
            f"the upload is {st.st_size} bytes ({st.st_size / MiB:.1f} MiB), more than the bound of "
            f"{max_bytes} bytes ({max_bytes / MiB:.1f} MiB; {LIMIT_HINT})"
        )
    return f, st.st_size


def _check_data_size(layout: _Layout, max_bytes: int) -> None:
    if layout.nbytes > max_bytes:
        raise UploadTooLarge(
            f"the header declares {layout.nbytes} bytes of voxel data ({layout.describe()}), more than the bound "
            f"of {max_bytes} bytes ({max_bytes / MiB:.1f} MiB; {LIMIT_HINT})"
        )


def _shape3(dims: list[int], what: str) -> tuple[int, int, int]:
    """A 3D shape from declared dims: none below 1, and any past the third equal to 1."""
    if any(d < 1 for d in dims):
        raise UploadError(f"{what} declares dimensions {tuple(dims)}: each must be at least 1")
    if len(dims) > 3 and any(d != 1 for d in dims[3:]):
        raise UploadError(f"{what} declares dimensions {tuple(dims)}: a 3D volume is required")
    padded = (list(dims) + [1, 1, 1])[:3]
    return padded[0], padded[1], padded[2]


def _numeric(dtype: np.dtype, what: str) -> np.dtype:
    if dtype.kind not in "uif" or dtype.fields is not None:
        raise UploadError(f"{what} data type {dtype} is not accepted (integer or floating point)")
    return dtype


def _nifti_layout(stream: _Stream, head: bytes, gz: bool) -> _Layout:
    """Header (and extensions, up to vox_offset) of a single-file NIfTI, checked; ``head`` is
    what was read so far and the stream is left at the first voxel."""
    if head[:4] in NIFTI1_SIZES:
        order, size, klass, magic = NIFTI1_SIZES[head[:4]], 348, nib.Nifti1Header, head[344:348]
        name, single, pair = "NIfTI-1", b"n+1\0", b"ni1\0"
    else:
        order, size, klass, magic = NIFTI2_SIZES[head[:4]], 540, nib.Nifti2Header, head[4:8]
        name, single, pair = "NIfTI-2", b"n+2\0", b"ni2\0"
    if len(head) < size:
        raise UploadError(f"the upload ends inside its {name} header ({len(head)} of {size} bytes)")
    if magic == pair:
        raise UploadError(f"a {name} pair header (.hdr/.img) is not accepted: send a single .nii or .nii.gz file")
    if magic != single:
        raise UploadError(f"{name}-sized header without the {name} magic (Analyze 7.5?) is not accepted: {ACCEPTED}")
    if size == 348:
        vox_offset = struct.unpack(order + "f", head[108:112])[0]
    else:
        vox_offset = struct.unpack(order + "q", head[168:176])[0]
    if not np.isfinite(vox_offset) or vox_offset != int(vox_offset) or not size + 4 <= vox_offset <= MAX_HEADER_BYTES:
        raise UploadError(
            f"{name} vox_offset {vox_offset} is not accepted: the data must start after the header "
            f"and within {MAX_HEADER_BYTES} bytes"
        )
    vox_offset = int(vox_offset)
    if len(head) >= vox_offset:
        prefix = head[:vox_offset]
        stream.unread(head[vox_offset:])
    else:
        prefix = head + stream.read_exact(vox_offset - len(head), f"{name} header and extensions")
    try:
        hdr = klass.from_fileobj(io.BytesIO(prefix), endianness=order)  # sizeof_hdr's order, not a guess
        dims = [int(d) for d in hdr["dim"]]
        dtype = hdr.get_data_dtype()
    except Exception as e:  # nibabel's HeaderDataError and friends: anything odd in a header
        raise UploadError(f"the {name} header is not valid ({type(e).__name__}: {e})") from e
    if not 1 <= dims[0] <= 7:
        raise UploadError(f"{name} header declares {dims[0]} dimensions (1 to 7 allowed, a 3D volume required)")
    shape = _shape3(dims[1 : dims[0] + 1], f"the {name} header")
    return _Layout("nifti", shape, _numeric(dtype, name), hdr, ".nii.gz" if gz else ".nii")


def _nrrd_header_lines(stream: _Stream, head: bytes) -> list[str]:
    """The NRRD header's lines (up to the blank line), the stream left at the first data byte.
    A detached header is named as such; a header without an end, or not ASCII, is refused."""
    buf = head
    while True:
        end = min((i for i in (buf.find(b"\n\n"), buf.find(b"\n\r\n")) if i >= 0), default=-1)
        if end >= 0 or len(buf) > MAX_HEADER_BYTES:
            break
        more = stream.read(64 * 1024)
        if not more:
            break
        buf += more
    text = buf[:end] if end >= 0 else buf[:MAX_HEADER_BYTES]
    lines = [line.rstrip("\r") for line in text.decode("ascii", errors="replace").split("\n")]
    for line in lines[1:]:  # first, so that a detached header is named as such, blank line or not
        if line.startswith("#") or ":" not in line:
            continue
        field, value = line.split(":", 1)
        if field.replace(" ", "").lower() == "datafile":
            shown = value.lstrip("=").strip()
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            raise UploadError(
                f"detached NRRD headers (data file: {shown}) are not accepted: send the data in the same file"
            )
    if end < 0 or end > MAX_HEADER_BYTES:
        raise UploadError(
            f"the NRRD header has no blank line ending it within {MAX_HEADER_BYTES} bytes: "
            "send the data in the same file, after the header"
        )
    if not text.isascii():
        raise UploadError("the NRRD header is not ASCII text")
    stream.unread(buf[buf.index(b"\n", end + 1) + 1 :])
    return lines


def _nrrd_layout(stream: _Stream, head: bytes) -> tuple[_Layout, _Stream]:
    """The NRRD text header, checked, and a stream at the first voxel (inflating if gzip)."""
    import nrrd

    lines = _nrrd_header_lines(stream, head)
    try:
        header = nrrd.read_header(lines)  # a list of lines: pynrrd opens nothing
    except Exception as e:
        raise UploadError(f"the NRRD header cannot be parsed ({type(e).__name__}: {e})") from e

    shape, dtype, encoding = _nrrd_data(header)
    directions, origin = _nrrd_space(header)
    header["space directions"], header["space origin"] = directions, origin
    layout = _Layout("nrrd", shape, dtype, header, ".nrrd")
    if encoding == "raw":
        return layout, stream
    return layout, _Stream(stream.read, wbits=47)  # zlib or gzip wrapper, as teem writes either


def _nrrd_data(header: dict) -> tuple[tuple[int, int, int], np.dtype, str]:
    """Shape, voxel type and encoding: a 3D volume of numbers, raw or gzip, right after the header."""
    dimension = header.get("dimension")
    if dimension != 3:
        raise UploadError(
            f"NRRD dimension {dimension}: a 3D volume is required (a 4D NRRD such as a multi-layer Slicer "
            "seg.nrrd is not accepted: export a 3D labelmap)"
        )
    sizes = [int(s) for s in np.atleast_1d(header.get("sizes", []))]
    if len(sizes) != 3:
        raise UploadError(f"NRRD sizes {sizes} do not give 3 dimensions")
    shape = _shape3(sizes, "the NRRD header")
    type_name = str(header.get("type", "")).strip().lower()
    if type_name not in NRRD_TYPES:
        raise UploadError(f"NRRD type {type_name!r} is not accepted (integer or floating point)")
    dtype = np.dtype(NRRD_TYPES[type_name])
    if dtype.itemsize > 1:
        endian = str(header.get("endian", "")).strip().lower()
        if endian not in ("little", "big"):
            raise UploadError(f"NRRD endian {endian or None!r}: 'little' or 'big' is required for type {type_name!r}")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    encoding = str(header.get("encoding", "")).strip().lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise UploadError(f"NRRD encoding {encoding!r} is not accepted (raw or gzip)")
    for skip in ("line skip", "lineskip", "byte skip", "byteskip"):
        if header.get(skip, 0) != 0:
            raise UploadError(f"NRRD {skip!r} is not accepted: the data must follow the header directly")
    return shape, dtype, encoding


def _nrrd_space(header: dict) -> tuple[np.ndarray, np.ndarray]:
    """Space directions and origin: three independent finite axes in LPS or RAS."""
    space = str(header.get("space", "")).strip().lower()
    if space not in NRRD_SPACES:
        raise UploadError(
            f"NRRD space {header.get('space')!r} is not accepted (left-posterior-superior or right-anterior-superior)"
        )
    directions = np.asarray(header.get("space directions", np.full((3, 3), np.nan)), dtype=float)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)) or abs(np.linalg.det(directions)) < 1e-12:
        raise UploadError("NRRD space directions must be 3 finite, independent vectors (one per axis)")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise UploadError("NRRD space origin must be 3 finite numbers")
    return directions, origin


def _inspect(f: io.BufferedReader, size: int) -> tuple[_Layout, _Stream] | None:
    """The format by content (gzip, then what is inside it): the layout and a stream at the first
    voxel, or None when the bytes carry no volume magic at all (perhaps a raw labelmap)."""
    plain = _Stream(f.read)
    head = plain.read(540)
    if head.startswith(GZIP_MAGIC):
        plain.unread(head)
        stream = _Stream(plain.read, wbits=31)
        inner = stream.read(540)
        if inner[:4] in NIFTI1_SIZES or inner[:4] in NIFTI2_SIZES:
            return _nifti_layout(stream, inner, gz=True), stream
        raise UploadError(f"a gzip-compressed upload must hold a NIfTI file; this one does not ({ACCEPTED})")
    if head[:4] in NIFTI1_SIZES or head[:4] in NIFTI2_SIZES:
        layout = _nifti_layout(plain, head, gz=False)
        layout.known_length = size - int(layout.header.get_data_offset())
        return layout, plain
    if head.startswith(NRRD_MAGIC):
        layout, stream = _nrrd_layout(plain, head)
        if stream is plain:
            layout.known_length = size - plain.delivered
        return layout, stream
    if head[128:132] == b"DICM":
        raise UploadError(f"a DICOM file is not accepted here: send {ACCEPTED}")
    return None


def _read_data(layout: _Layout, stream: _Stream, keep: bool) -> np.ndarray | None:
    """The declared voxels, inflating no more than declared; data shorter or longer is refused."""
    n = layout.nbytes
    if layout.known_length is not None and layout.known_length != n:
        more_less = "shorter" if layout.known_length < n else "longer"
        raise UploadError(
            f"the {layout.kind.upper()} data is {more_less} than its header declares: {layout.known_length} bytes "
            f"after the header, {n} declared ({layout.describe()})"
        )
    buf = np.empty(n, np.uint8) if keep else None  # pages are touched only as data arrives
    got = stream.fill(memoryview(buf) if buf is not None else None, n)
    if got < n:
        raise UploadError(
            f"the {layout.kind.upper()} data is shorter than its header declares: {got} of {n} bytes "
            f"({layout.describe()})"
        )
    if stream.read(1):
        raise UploadError(
            f"the {layout.kind.upper()} data is longer than its header declares ({n} bytes, {layout.describe()})"
        )
    if buf is None:
        return None
    arr = buf.view(layout.dtype).reshape(layout.shape, order="F")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if layout.kind == "nifti":  # the scaling nibabel's array proxy applies
        slope, inter = layout.header.get_slope_inter()
        slope, inter = np.asanyarray(1.0 if slope is None else slope), np.asanyarray(0.0 if inter is None else inter)
        if slope != 1 or inter != 0:
            arr = apply_read_scaling(arr, slope, inter)
    return arr


def _squeeze3(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape without the singleton axes past the third (NIfTI's (x, y, z, 1))."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_label(path: str | Path, image: Volume, max_bytes: int, raw_ok: bool = True) -> Volume:
    """An uploaded label map on ``image``'s voxels, read by content: NIfTI or attached-data NRRD,
    or (``raw_ok``, OHIF's .bin) raw uint8 in Fortran order with exactly one byte per image voxel.
    Its array has the image's shape; raises UploadError (UploadTooLarge for size bounds).
    The grid (affine) is the caller's to compare."""
    expected = tuple(image.array.shape)
    f, size = _open(path, max_bytes)
    with f:
        found = _inspect(f, size)
        if found is None:
            voxels = prod(expected)
            if raw_ok and size == voxels:
                f.seek(0)
                raw = np.fromfile(f, np.uint8, count=size).reshape(expected, order="F")
                return Volume(raw, Path(path), image.kind, image.header)
            raw_note = (
                f", nor a raw labelmap (it has {size} bytes; the image has {voxels} voxels, one byte each)"
                if raw_ok
                else ""
            )
            raise UploadError(f"the label is not a readable volume: it is not {ACCEPTED}{raw_note}")
        layout, stream = found
        if _squeeze3(layout.shape) != _squeeze3(expected):
            raise UploadError(f"label shape {layout.shape} differs from the image shape {expected}")
        _check_data_size(layout, max_bytes)
        arr = _read_data(layout, stream, keep=True)
    assert arr is not None
    arr = arr.reshape(expected)
    if layout.kind == "nrrd":
        return Volume(arr, Path(path), "nrrd", layout.header)
    klass = nib.Nifti2Image if isinstance(layout.header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(arr, layout.header.get_best_affine(), header=layout.header)  # nib.load's affine
    return Volume(arr, Path(path), "nifti", img)


def check_image(path: str | Path, max_bytes: int) -> str:
    """An uploaded image (a new CT), validated by content as labels are (self-contained, 3D,
    declared data within ``max_bytes``, data exactly as long as declared) without keeping its
    voxels. Returns the extension to store it under: ".nii.gz", ".nii" or ".nrrd"."""
    f, size = _open(path, max_bytes)
    with f:
        found = _inspect(f, size)
        if found is None:
            raise UploadError(f"the image is not a readable volume: it is not {ACCEPTED}")
        layout, stream = found
        _check_data_size(layout, max_bytes)
        _read_data(layout, stream, keep=False)
    return layout.ext

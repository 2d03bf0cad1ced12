"""Hostile inputs for the reader and the dataset loader (issue 13): every one becomes one clear
ImageReadError / DatasetError naming the file and the reason, and the other files still read."""

from __future__ import annotations

import csv
import io
import os
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cxrnn.data import errors as read_errors
from cxrnn.data.dataset import DatasetError, list_image_files, load_dataset
from cxrnn.data.io import (
    MAX_FILE_BYTES,
    ImageReadError,
    check_regular_file,
    header_size,
    read_image,
    reference_radiograph,
)

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
needs_dev_zero = pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")


def _good_png(path: Path) -> Path:
    arr = np.zeros((48, 64), np.uint8)
    arr[:, :32] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "PNG")
    return path


def _read_all(paths: list[Path]) -> dict[Path, np.ndarray | str]:
    """What a batch command does: one result or one error line per file."""
    out: dict[Path, np.ndarray | str] = {}
    for p in paths:
        try:
            out[p] = read_image(p)
        except ImageReadError as err:
            out[p] = str(err)
    return out


def _with_timeout(fn, seconds: float = 10.0):
    # A regression here would hang the test run forever; fail it instead.
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_capture(fn)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "reading hung"
    kind, value = result[0]
    if kind == "error":
        raise value
    return value


def _capture(fn):
    try:
        return ("ok", fn())
    except BaseException as exc:  # re-raised in the test's thread
        return ("error", exc)


def _manifest(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


# ----------------------------------------------------- 1. regular files only, bounded


@needs_fifo
def test_fifo_is_one_error_and_never_opened(tmp_path):
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    good = _good_png(tmp_path / "good.png")
    results = _with_timeout(lambda: _read_all([fifo, good]))
    assert results[fifo] == f"{fifo}: not a regular file (a named pipe (FIFO))"
    assert isinstance(results[good], np.ndarray)


@needs_dev_zero
def test_link_to_dev_zero_is_not_read(tmp_path):
    link = tmp_path / "zero.dcm"
    link.symlink_to("/dev/zero")
    good = _good_png(tmp_path / "good.png")
    results = _with_timeout(lambda: _read_all([link, good]))
    assert results[link] == f"{link}: not a regular file (a character device)"
    assert isinstance(results[good], np.ndarray)


def test_file_over_size_cap(tmp_path, monkeypatch):
    assert MAX_FILE_BYTES == 512 * 1024 * 1024
    big = _good_png(tmp_path / "big.png")
    size = big.stat().st_size
    monkeypatch.setattr(read_errors, "MAX_FILE_BYTES", size - 1)
    with pytest.raises(ImageReadError) as info:
        read_image(big)
    assert str(info.value) == f"{big}: file too large ({size:,} bytes, maximum {size - 1:,})"
    with pytest.raises(ImageReadError, match="up.png: file too large"):
        read_image(big.read_bytes(), name="up.png")
    monkeypatch.setattr(read_errors, "MAX_FILE_BYTES", size)
    assert read_image(big).shape == (48, 64)


def test_check_regular_file(tmp_path):
    good = _good_png(tmp_path / "g.png")
    assert check_regular_file(good).st_size == good.stat().st_size
    with pytest.raises(ImageReadError, match="is a directory"):
        check_regular_file(tmp_path)
    with pytest.raises(ImageReadError, match="file not found"):
        check_regular_file(tmp_path / "none.png")


@needs_fifo
def test_fifo_in_data_folder_is_skipped_with_warning(tmp_path):
    root = tmp_path / "ds"
    _good_png(root / "covid" / "c.png")
    _good_png(root / "normal" / "n.png")
    os.mkfifo(root / "normal" / "pipe.png")
    os.mkfifo(root / "normal" / "noext")  # would be sniffed for DICOM: must not be opened
    with pytest.warns(UserWarning, match=r"ignored .*pipe\.png: not a regular file \(a named pipe"):
        ds = _with_timeout(lambda: load_dataset(root))
    assert [s.path.name for s in ds.samples] == ["c.png", "n.png"]
    # Listing for predict keeps it, so the reader names it in the command's output.
    files = _with_timeout(lambda: list_image_files([root]))
    assert root / "normal" / "pipe.png" in files and root / "normal" / "noext" not in files


@needs_fifo
def test_fifo_in_manifest_is_refused(tmp_path):
    _good_png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "p.png")
    m = _manifest(tmp_path / "m.csv", [("a.png", "normal"), ("p.png", "covid")])
    with pytest.raises(DatasetError) as info:
        _with_timeout(lambda: load_dataset(m))
    assert str(info.value) == (
        f"{m}: 1 listed path(s) are not regular files: p.png (line 3): not a regular file (a named pipe (FIFO))"
    )


# ----------------------------------------------------- 2. decoder exceptions become read errors


def _palette_rgb_dicom() -> bytes:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    ds.Modality = "DX"  # a secondary capture (OT) would be refused before its pixels are decoded
    ds.PhotometricInterpretation = "PALETTE COLOR"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_photometric_mismatch_is_a_read_error(tmp_path):
    bad = tmp_path / "pal.dcm"
    bad.write_bytes(_palette_rgb_dicom())
    good = _good_png(tmp_path / "good.png")
    results = _read_all([bad, good])
    assert results[bad] == f"{bad}: unreadable DICOM (PhotometricInterpretation PALETTE COLOR does not match its 3-sample pixels)"
    assert isinstance(results[good], np.ndarray)


@pytest.mark.parametrize("photometric, reason", [
    ("PALETTE COLOR", "PhotometricInterpretation PALETTE COLOR without a usable palette: "),
    ("RGB", "PhotometricInterpretation RGB does not match its 1-sample pixels"),
    ("YBR_FULL", "cannot decode pixel data: "),  # pydicom refuses first, in its own words
])
def test_grey_pixels_retagged_as_colour_are_a_read_error_not_a_guess(tmp_path, photometric, reason):
    # The real radiograph (MONOCHROME1): read as grey under another tag it would come out inverted.
    import pydicom

    ds = pydicom.dcmread(reference_radiograph("RG1_UNCR.dcm"))
    ds.PhotometricInterpretation = photometric
    bad = tmp_path / "retagged.dcm"
    ds.save_as(bad)
    assert _read_all([bad])[bad].startswith(f"{bad}: unreadable DICOM ({reason}")


def test_real_palette_images_still_decode():
    for name in ("OT-PAL-8-face.dcm", "OBXXXX1A.dcm"):  # 8- and 16-bit palettes, one sample per pixel
        image = read_image(reference_radiograph(name), acquisition="flag")  # not radiographs: read all the same
        assert image.ndim == 2 and 0.0 <= image.min() < image.max() <= 1.0


def test_unexpected_decoder_exception_is_a_read_error(tmp_path, monkeypatch):
    from cxrnn.data import io as reader

    def boom(*_a, **_k):
        raise KeyError("weird")

    monkeypatch.setattr(reader, "_pil_to_grey", boom)
    p = _good_png(tmp_path / "a.png")
    with pytest.raises(ImageReadError) as info:
        read_image(p)
    assert str(info.value) == f"{p}: cannot decode PNG image (KeyError: 'weird')"


@pytest.mark.filterwarnings("error")
def test_random_bytes_after_magic_never_escape(tmp_path):
    rng = np.random.default_rng(13)
    heads = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM" + bytes(30), b"II*\x00", b"MM\x00*",
             b"GIF89a", b"\0" * 128 + b"DICM", b"\x08\x00\x05\x00CS"]
    for i, head in enumerate(heads):
        for j in range(20):
            data = head + rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()
            try:
                read_image(data, name=f"r{i}_{j}")
            except ImageReadError as err:
                assert str(err).startswith(f"r{i}_{j}: ") and "\n" not in str(err)


# ----------------------------------------------------- 3. constant images in every format


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
@pytest.mark.parametrize("value", [0, 255])
def test_constant_image_is_blank(tmp_path, fmt, value):
    p = tmp_path / f"c.{fmt.lower()}"
    p.write_bytes(_encode(np.full((48, 64), value, np.uint8), fmt))
    good = _good_png(tmp_path / "good.png")
    results = _read_all([p, good])
    assert results[p] == f"{p}: blank image (constant pixel value)"
    assert isinstance(results[good], np.ndarray)


def test_constant_16bit_png_is_blank(tmp_path):
    p = tmp_path / "c16.png"
    p.write_bytes(_encode(np.full((48, 64), 40000, np.uint16), "PNG"))
    with pytest.raises(ImageReadError) as info:
        read_image(p)
    assert str(info.value) == f"{p}: blank image (constant pixel value)"


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_fully_transparent_image_is_blank(tmp_path, fmt):
    rgba = np.zeros((48, 64, 4), np.uint8)
    p = tmp_path / f"t.{fmt.lower()}"
    p.write_bytes(_encode(rgba, fmt, "RGBA"))
    with pytest.raises(ImageReadError) as info:
        read_image(p)
    assert str(info.value) == f"{p}: blank image (fully transparent)"
    rgba[:, :32, :3] = 255  # a picture under zero alpha is still not shown
    p.write_bytes(_encode(rgba, fmt, "RGBA"))
    with pytest.raises(ImageReadError) as info:
        read_image(p)
    assert str(info.value) == f"{p}: blank image (fully transparent)"


# ----------------------------------------------------- 4. messages that mislead


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_bomb_reports_its_real_pixel_count(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(20000, 20000))
    with pytest.raises(ImageReadError) as info:
        read_image(p)
    assert str(info.value) == (
        f"{p}: image too large (20000x20000 px = 400,000,000 pixels, maximum 100,000,000)"
    )
    assert header_size(p.read_bytes()) == (20000, 20000)


def _gradient() -> np.ndarray:
    return (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 4096).astype(np.uint16)


def test_huge_rescale_slope_is_a_clear_reason_without_warnings(tmp_path, dicom_bytes):
    p = tmp_path / "slope.dcm"
    p.write_bytes(dicom_bytes(_gradient(), bits_stored=12, RescaleSlope="1e300", RescaleIntercept="0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with pytest.raises(ImageReadError) as info:
            read_image(p)
    assert str(info.value) == (
        f"{p}: unreadable DICOM (RescaleSlope/RescaleIntercept scale the pixels beyond the float range: "
        "slope 1e300, intercept 0)"
    )


def test_dicom_without_rows_names_the_missing_tag(tmp_path, dicom_bytes):
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.write_bytes(dicom_bytes(_gradient(), bits_stored=12, rows=False))
    b.write_bytes(dicom_bytes(_gradient(), bits_stored=12, rows=False, WindowCenter="2000", WindowWidth="4000"))
    good = _good_png(tmp_path / "good.png")
    results = _read_all([a, b, good])
    assert results[a] == f"{a}: unreadable DICOM (no Rows in header)"
    assert results[b] == f"{b}: unreadable DICOM (no Rows in header)"
    assert isinstance(results[good], np.ndarray)


def test_png_with_large_text_chunk_decodes(tmp_path):
    arr = np.zeros((48, 64), np.uint8)
    arr[:, :32] = 255
    info = PngImagePlugin.PngInfo()
    # Compressed to a few KB, but over PIL's 1 MB decompressed text limit.
    info.add_text("Comment", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 10), zip=True)
    p = tmp_path / "text.png"
    Image.fromarray(arr).save(p, "PNG", pnginfo=info)
    img = read_image(p)
    assert img.shape == (48, 64) and img[:, 0].min() == 1.0 and img[:, -1].max() == 0.0


def test_corrupt_png_with_text_chunk_is_still_corrupt(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(buf, "PNG", pnginfo=info)
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError) as err:
        read_image(p)
    assert str(err.value) == f"{p}: truncated or corrupt image data"


# ----------------------------------------------------- 5. manifest paths outside its folder


def test_manifest_path_outside_folder_is_refused(tmp_path):
    secret = _good_png(tmp_path / "secret.png")
    ds_dir = tmp_path / "ds"
    _good_png(ds_dir / "a.png")
    (ds_dir / "link.png").symlink_to(secret)
    m = _manifest(ds_dir / "m.csv", [("a.png", "normal"), ("../secret.png", "covid"),
                                      (str(secret), "covid"), ("link.png", "covid")])
    with pytest.raises(DatasetError) as info:
        load_dataset(m)
    assert str(info.value) == (
        f"{m}: 3 listed path(s) lie outside the manifest's folder {ds_dir.resolve()}: "
        f"../secret.png (line 3), {secret} (line 4), link.png (line 5) "
        "(allow them with allow_outside_paths / --allow-outside-paths if that is intended)"
    )
    ds = load_dataset(m, allow_outside_paths=True)
    assert len(ds) == 4


def test_manifest_outside_check_runs_before_touching_the_file(tmp_path):
    ds_dir = tmp_path / "ds"
    _good_png(ds_dir / "a.png")
    m = _manifest(ds_dir / "m.csv", [("a.png", "normal"), ("../../etc/shadow", "covid")])
    with pytest.raises(DatasetError, match=r"outside the manifest's folder .*\.\./\.\./etc/shadow \(line 3\)"):
        load_dataset(m)


# ----------------------------------------------------- 6. classes that have images


def test_classes_with_images(tmp_path):
    root = tmp_path / "ds"
    _good_png(root / "normal" / "n.png")
    ds = load_dataset(root, classes=["covid", "normal"])
    assert ds.classes == ["covid", "normal"]
    assert ds.classes_with_images() == ["normal"]

"""Tests for cxrnn.data.io (with .dicom and .errors): every supported format, every bad-file kind, real DICOMs."""

from __future__ import annotations

import io
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrnn.data import errors as read_errors
from cxrnn.data.dicom import window_output_range
from cxrnn.data.io import (
    MIN_SIDE,
    ImageReadError,
    is_image_file,
    read_image,
    reference_radiograph,
    sniff_format,
)

H, W = 48, 64  # deliberately non-square so transposes show up in shapes


def _left_bright(dtype=np.uint8, hi: int = 255, lo: int = 0) -> np.ndarray:
    arr = np.full((H, W), lo, dtype=dtype)
    arr[:, : W // 2] = hi
    return arr


def _save_pil(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _assert_grey01(img: np.ndarray, shape=(H, W)) -> None:
    assert img.dtype == np.float32
    assert img.shape == shape
    assert img.min() >= 0.0 and img.max() <= 1.0


def _assert_left_bright(img: np.ndarray, hi: float = 1.0, lo: float = 0.0, tol: float = 0.02) -> None:
    left = img[:, : img.shape[1] // 2 - 2]
    right = img[:, img.shape[1] // 2 + 2 :]
    assert abs(float(left.mean()) - hi) < tol, left.mean()
    assert abs(float(right.mean()) - lo) < tol, right.mean()


# ------------------------------------------------------------------ DICOM


# ------------------------------------------------------------ good formats


def test_png_8bit_grey(tmp_path):
    p = _write(tmp_path, "a.png", _save_pil(Image.fromarray(_left_bright()), "PNG"))
    img = read_image(p)
    _assert_grey01(img)
    _assert_left_bright(img)


def test_png_16bit_scaled_by_dtype_max(tmp_path):
    # A 12-bit detector value in a 16-bit PNG must stay dim, not be stretched.
    arr = _left_bright(np.uint16, hi=4095, lo=0)
    data = _save_pil(Image.fromarray(arr), "PNG")
    img = read_image(data)
    _assert_grey01(img)
    _assert_left_bright(img, hi=4095 / 65535, lo=0.0, tol=1e-4)


def test_png_rgb_uses_luma(tmp_path):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (255, 0, 0)  # pure red -> 601 luma 0.299
    img = read_image(_save_pil(Image.fromarray(rgb), "PNG"))
    _assert_grey01(img)
    _assert_left_bright(img, hi=0.299, lo=0.0, tol=0.01)


def test_png_rgba_alpha_dropped(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, : W // 2, :3] = 255
    rgba[..., 3] = 10  # nearly transparent everywhere: pixels must survive
    img = read_image(_save_pil(Image.fromarray(rgba, "RGBA"), "PNG"))
    _assert_grey01(img)
    _assert_left_bright(img)


def test_png_grey_alpha(tmp_path):
    la = np.zeros((H, W, 2), np.uint8)
    la[:, : W // 2, 0] = 200
    la[..., 1] = 255
    img = read_image(_save_pil(Image.fromarray(la, "LA"), "PNG"))
    _assert_grey01(img)
    _assert_left_bright(img, hi=200 / 255)


def test_png_palette(tmp_path):
    im = Image.fromarray(_left_bright()).convert("P")
    assert im.mode == "P"
    img = read_image(_save_pil(im, "PNG"))
    _assert_grey01(img)
    _assert_left_bright(img)


def test_jpeg_exif_orientation_rotates(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 deg clockwise
    data = _save_pil(Image.fromarray(_left_bright()), "JPEG", quality=95, exif=exif.tobytes())
    img = read_image(_write(tmp_path, "r.jpg", data))
    _assert_grey01(img, shape=(W, H))
    # Rotating clockwise carries the stored left half to the top.
    top, bottom = img[: W // 2 - 4], img[W // 2 + 4 :]
    assert top.mean() > 0.9 and bottom.mean() < 0.1


def test_jpeg_plain(tmp_path):
    img = read_image(_save_pil(Image.fromarray(_left_bright()), "JPEG", quality=95))
    _assert_grey01(img)
    _assert_left_bright(img, tol=0.05)


def test_bmp(tmp_path):
    img = read_image(_write(tmp_path, "a.bmp", _save_pil(Image.fromarray(_left_bright()), "BMP")))
    _assert_grey01(img)
    _assert_left_bright(img)


def test_tiff_16bit(tmp_path):
    arr = _left_bright(np.uint16, hi=65535, lo=1000)
    img = read_image(_write(tmp_path, "a.tif", _save_pil(Image.fromarray(arr), "TIFF")))
    _assert_grey01(img)
    _assert_left_bright(img, hi=1.0, lo=1000 / 65535, tol=1e-4)


def test_tiff_float():
    arr = _left_bright(np.float32, hi=0.75, lo=0.25)
    img = read_image(_save_pil(Image.fromarray(arr, "F"), "TIFF"))
    _assert_grey01(img)
    _assert_left_bright(img, hi=0.75, lo=0.25, tol=1e-6)


def test_dicom_monochrome2_rescale_and_window(tmp_path, dicom_bytes):
    stored = np.tile(np.linspace(0, 4000, W, dtype=np.float64), (H, 1)).astype(np.uint16)
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 4000.0
    data = dicom_bytes(
        stored,
        bits_stored=12,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
    )
    img = read_image(_write(tmp_path, "w.dcm", data))
    _assert_grey01(img)
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window on the rescaled values.
    hu = stored * slope + intercept
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-4)
    # The window clips both ends, which plain min-max would not do.
    assert (img == 0).any() and (img == 1).any()


@pytest.mark.parametrize("function, center, width", [
    (None, 1500.0, 2000.0), ("LINEAR", 800.0, 300.0), ("LINEAR_EXACT", 2000.5, 1000.0),
    ("SIGMOID", 1200.0, 900.0), ("LINEAR", [900.0, 2500.0], [400.0, 1500.0]),
])
def test_dicom_fast_window_matches_pydicom(tmp_path, function, center, width, dicom_bytes):
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = np.tile(np.linspace(0, 4095, W, dtype=np.float64), (H, 1)).astype(np.uint16)
    extra = {"VOILUTFunction": function} if function else {}
    path = _write(tmp_path, "w.dcm", dicom_bytes(stored, bits_stored=12, WindowCenter=center, WindowWidth=width, **extra))
    ds = pydicom.dcmread(path)
    lo, hi = window_output_range(ds)
    reference = (np.asarray(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds), dtype=np.float64) - lo) / (hi - lo)
    img = read_image(path)
    assert img.dtype == np.float32
    np.testing.assert_allclose(img, np.clip(reference, 0, 1), atol=1e-6)
    assert 0 < img.mean() < 1


def test_dicom_monochrome1_inverted(tmp_path, dicom_bytes):
    stored = _left_bright(np.uint16, hi=3000, lo=200)
    img = read_image(dicom_bytes(stored, "MONOCHROME1", bits_stored=12))
    _assert_grey01(img)
    # MONOCHROME1: high stored value = dark, so the stored-bright left is dark.
    _assert_left_bright(img, hi=0.0, lo=1.0, tol=1e-6)


def test_dicom_monochrome2_no_voi_minmax(tmp_path, dicom_bytes):
    stored = _left_bright(np.uint16, hi=3000, lo=200)
    img = read_image(dicom_bytes(stored, bits_stored=12))
    _assert_left_bright(img, tol=1e-6)


def test_dicom_rgb_to_grey(dicom_bytes):
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = 255
    img = read_image(dicom_bytes(rgb, "RGB", bits_stored=8))
    _assert_grey01(img)
    _assert_left_bright(img, tol=1e-3)


def test_dicom_multiframe_first_frame(dicom_bytes):
    frames = np.zeros((3, H, W), np.uint16)
    frames[0, :, : W // 2] = 1000
    frames[1:, :, W // 2 :] = 1000  # later frames are the opposite
    img = read_image(dicom_bytes(frames, bits_stored=12))
    _assert_grey01(img)
    _assert_left_bright(img, tol=1e-6)


def test_dicom_without_suffix_is_image_file(tmp_path, dicom_bytes):
    data = dicom_bytes(_left_bright(np.uint16, hi=1000), bits_stored=12)
    plain = _write(tmp_path, "IM0001", data)
    uid_named = _write(tmp_path, "1.2.840.10008.99", data)
    text = _write(tmp_path, "README", b"hello")
    assert is_image_file(plain) and is_image_file(uid_named)
    assert not is_image_file(text)
    assert is_image_file(tmp_path / "X.PNG") and not is_image_file(tmp_path / "x.txt")
    _assert_left_bright(read_image(plain), tol=1e-6)


# ------------------------------------------------------- bytes and lies


def test_bytes_equal_path(tmp_path):
    data = _save_pil(Image.fromarray(_left_bright()), "PNG")
    p = _write(tmp_path, "a.png", data)
    np.testing.assert_array_equal(read_image(p), read_image(data))


def test_extension_lies(tmp_path, dicom_bytes):
    png = _save_pil(Image.fromarray(_left_bright()), "PNG")
    dcm = dicom_bytes(_left_bright(np.uint16, hi=1000), bits_stored=12)
    _assert_left_bright(read_image(_write(tmp_path, "liar.jpg", png)))
    _assert_left_bright(read_image(_write(tmp_path, "liar.png", dcm)), tol=1e-6)


def test_sniff_format(dicom_bytes):
    assert sniff_format(_save_pil(Image.fromarray(_left_bright()), "PNG")) == "png"
    assert sniff_format(_save_pil(Image.fromarray(_left_bright()), "JPEG")) == "jpeg"
    assert sniff_format(_save_pil(Image.fromarray(_left_bright()), "BMP")) == "bmp"
    assert sniff_format(_save_pil(Image.fromarray(_left_bright()), "TIFF")) == "tiff"
    assert sniff_format(_save_pil(Image.fromarray(_left_bright()), "GIF")) == "gif"
    assert sniff_format(dicom_bytes(_left_bright(np.uint16), bits_stored=12)) == "dicom"
    assert sniff_format(b"just some text") is None
    assert sniff_format(b"") is None


# --------------------------------------------------------------- bad files


def _bad(source, name=None) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_image(source, name=name)
    return info.value


def _check_bad(path: Path, *words: str) -> None:
    err = _bad(path)
    text = str(err)
    assert text.startswith(f"{path}: "), text
    assert "\n" not in text
    assert err.path == path
    for w in words:
        assert w in err.reason, text


def test_zero_bytes(tmp_path):
    _check_bad(_write(tmp_path, "x.png", b""), "empty file (0 bytes)")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    data = _save_pil(Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)), "PNG")
    _check_bad(_write(tmp_path, "t.png", data[: len(data) // 2]), "truncated or corrupt")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    data = _save_pil(Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)), "JPEG")
    _check_bad(_write(tmp_path, "t.jpg", data[: len(data) // 2]), "truncated or corrupt")


def test_text_named_png(tmp_path):
    _check_bad(_write(tmp_path, "z.png", b"this is not an image\n"), "not an image")


def test_dicom_without_pixel_data(tmp_path, dicom_bytes):
    data = dicom_bytes(_left_bright(np.uint16), pixels=False)
    _check_bad(_write(tmp_path, "a.dcm", data), "unreadable DICOM", "no pixel data")


def test_dicom_header_garbage(tmp_path):
    rng = np.random.default_rng(1)
    data = b"\0" * 128 + b"DICM" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
    _check_bad(_write(tmp_path, "g.dcm", data), "unreadable DICOM")


def test_too_small(tmp_path):
    data = _save_pil(Image.fromarray(np.zeros((18, 20), np.uint8)), "PNG")
    _check_bad(_write(tmp_path, "b.png", data), f"image too small (20x18 px, minimum {MIN_SIDE})")


def test_too_small_dicom(tmp_path, dicom_bytes):
    data = dicom_bytes(np.arange(20 * 20, dtype=np.uint16).reshape(20, 20), bits_stored=12)
    _check_bad(_write(tmp_path, "s.dcm", data), "image too small (20x20 px")


def test_directory(tmp_path):
    d = tmp_path / "folder.png"
    d.mkdir()
    _check_bad(d, "directory")


def test_missing_file(tmp_path):
    _check_bad(tmp_path / "nope.png", "file not found")


def test_blank_dicom(tmp_path, dicom_bytes):
    data = dicom_bytes(np.full((H, W), 7, np.uint16), bits_stored=12)
    _check_bad(_write(tmp_path, "c.dcm", data), "blank image (constant pixel value)")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            len(body).to_bytes(4, "big")
            + kind
            + body
            + zlib.crc32(kind + body).to_bytes(4, "big")
        )

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    # 30000^2 = 900M pixels declared in a ~60-byte file: must fail on the header.
    _check_bad(_write(tmp_path, "bomb.png", _png_header_only(30000, 30000)), "image too large")
    # Between our limit and PIL's own hard limit our check is the one that fires.
    _check_bad(_write(tmp_path, "big.png", _png_header_only(10001, 10000)), "image too large")


def test_max_pixels_is_configurable(monkeypatch):
    monkeypatch.setattr(read_errors, "MAX_PIXELS", 1000)
    err = _bad(_save_pil(Image.fromarray(_left_bright()), "PNG"), name="up.png")
    assert str(err).startswith("up.png: image too large")


def test_bytes_error_uses_name():
    assert str(_bad(b"", name="upload.png")) == "upload.png: empty file (0 bytes)"
    assert str(_bad(b"garbage")).endswith(": not an image (unrecognised content)")


def test_error_is_valueerror_and_picklable(tmp_path):
    err = ImageReadError(tmp_path / "x.png", "boom")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert again.path == err.path and again.reason == "boom" and str(again) == str(err)


# ------------------------------------------------------------ real images


def test_reference_radiograph_real_size_and_anatomy():
    path = reference_radiograph()
    assert path.name == "RG1_UNCR.dcm" and path.is_file()
    img = read_image(path)
    _assert_grey01(img, shape=(1955, 1841))
    h, w = img.shape
    # RG1 is a MONOCHROME1 CR chest: after inversion the spine/mediastinum must
    # be brighter than both lung fields (boxes chosen by looking at the image).
    spine = img[int(0.2 * h) : int(0.7 * h), int(0.47 * w) : int(0.53 * w)].mean()
    lung_left = img[int(0.2 * h) : int(0.5 * h), int(0.2 * w) : int(0.35 * w)].mean()
    lung_right = img[int(0.2 * h) : int(0.5 * h), int(0.65 * w) : int(0.8 * w)].mean()
    assert spine > lung_left + 0.15 and spine > lung_right + 0.15


def test_reference_radiograph_is_read_as_dicom_despite_tiff_preamble():
    # RG1_UNCR.dcm's 128-byte preamble is a TIFF header; the DICOM must win.
    data = reference_radiograph().read_bytes()
    assert data[:4] == b"II*\x00"
    assert sniff_format(data) == "dicom"


def test_reference_jpeg2000_matches_uncompressed():
    a = read_image(reference_radiograph("RG1_UNCR.dcm"))
    b = read_image(reference_radiograph("RG1_J2KR.dcm"))
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) < 1e-6  # lossless J2K


def test_reference_radiograph_missing_name():
    with pytest.raises(FileNotFoundError, match="no_such_file.dcm"):
        reference_radiograph("no_such_file.dcm")

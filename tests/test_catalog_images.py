"""The safe image loader and the one preprocessing definition."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from catalog.images import (
    DEFAULT_PREPROCESS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    Preprocess,
    load_image,
    normalize,
    preprocess,
    to_uint8,
)
from common.errors import FedcbirError


def _save(path, im, fmt, **kw):
    im.save(path, fmt, **kw)
    return path


def _png_header_only(width, height):
    """A tiny PNG whose header claims ``width`` x ``height`` (no real pixel data)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- conversions


def test_rgb_jpeg_loads_and_is_detached(tmp_path):
    p = _save(tmp_path / "a.jpg", Image.new("RGB", (40, 30), (200, 10, 10)), "JPEG")
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (40, 30)
    p.unlink()  # fully decoded: the file is not needed any more
    assert np.asarray(im)[15, 20, 0] > 180


def test_palette_with_transparency_goes_on_white(tmp_path):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (5, 0, 10, 10))
    p = _save(tmp_path / "p.png", im, "PNG", transparency=0)
    arr = np.asarray(load_image(p))
    assert arr.shape == (10, 10, 3)
    assert tuple(arr[5, 1]) == (255, 255, 255)  # transparent index → white
    assert tuple(arr[5, 8]) == (0, 0, 255)


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (4, 0, 8, 8))
    arr = np.asarray(load_image(_save(tmp_path / "a.png", rgba, "PNG")))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 6]) == (0, 128, 0)
    la = Image.new("LA", (6, 6), (0, 128))  # black at half opacity → mid grey
    arr = np.asarray(load_image(_save(tmp_path / "la.png", la, "PNG")))
    assert arr.shape == (6, 6, 3) and 120 <= arr[0, 0, 0] <= 135 and arr[0, 0, 0] == arr[0, 0, 2]


def test_cmyk_grey_and_bilevel_become_rgb(tmp_path):
    cmyk = _save(tmp_path / "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG")
    arr = np.asarray(load_image(cmyk))
    assert arr.shape == (16, 16, 3) and arr[8, 8, 0] > 200 and arr[8, 8, 1] < 60
    grey = np.asarray(load_image(_save(tmp_path / "g.png", Image.new("L", (5, 5), 77), "PNG")))
    assert grey.shape == (5, 5, 3) and (grey == 77).all()
    one = np.asarray(load_image(_save(tmp_path / "b.png", Image.new("1", (5, 5), 1), "PNG")))
    assert (one == 255).all()


def test_16_bit_and_32_bit_grey_are_scaled_not_clipped(tmp_path):
    a16 = np.array([[0, 32896, 65535]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a16).save(p)
    assert Image.open(p).mode.startswith("I")
    arr = np.asarray(load_image(p))
    assert arr.shape == (1, 3, 3) and list(arr[0, :, 0]) == [0, 128, 255]
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), "I").save(buf, "TIFF")
    arr = np.asarray(load_image(buf.getvalue()))
    assert list(arr[0, :, 1]) == [0, 4, 255]
    buf = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(buf, "TIFF")
    assert list(np.asarray(load_image(buf.getvalue()))[0, :, 2]) == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = tmp_path / "rot.jpg"
    im.save(p, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(p)
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60  # red is now on top
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


def test_bytes_input(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (3, 4), (1, 2, 3)).save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (3, 4)


# ----------------------------------------------------------------------------- failures


def _assert_image_error(src, fragment, **kw):
    with pytest.raises(ImageError) as info:
        load_image(src, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert fragment in msg, msg
    assert isinstance(info.value, FedcbirError)
    return msg


def test_every_bad_file_kind_gives_one_line_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    assert "not an image" in _assert_image_error(text, str(text))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty" in _assert_image_error(empty, str(empty))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _assert_image_error(trunc, str(trunc))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    trunc_png = tmp_path / "trunc.png"
    trunc_png.write_bytes(buf.getvalue()[:300])
    _assert_image_error(trunc_png, str(trunc_png))
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    assert "directory" in _assert_image_error(folder, str(folder))
    missing = tmp_path / "missing.jpg"
    assert "no such file" in _assert_image_error(missing, str(missing))
    _assert_image_error(b"", "empty")
    _assert_image_error(b"GIF89a-garbage", "bytes")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 20000))
    assert bomb.stat().st_size < 200
    msg = _assert_image_error(bomb, str(bomb))
    assert "decompression bomb" in msg.lower()
    # with our limit lifted, Pillow's own guard (a warning or error) still refuses it
    _assert_image_error(bomb, str(bomb), max_pixels=10**12)
    # under Pillow's own limit, ours (40 M pixels by default) refuses it
    big = tmp_path / "big.png"
    big.write_bytes(_png_header_only(7000, 7000))
    msg = _assert_image_error(big, str(big))
    assert "7000x7000" in msg and "decompression bomb" in msg
    small = tmp_path / "small.png"
    small.write_bytes(_png_header_only(300, 300))
    _assert_image_error(small, "exceeds", max_pixels=300 * 300 - 1)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_defaults_and_dict_round_trip():
    pre = DEFAULT_PREPROCESS
    assert (pre.size, pre.resize, pre.resample) == (96, "pad-white", "bilinear")
    assert pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD
    d = pre.to_dict()
    assert d["layout"] == "NHWC"
    assert Preprocess.from_dict(d) == pre
    import json

    assert Preprocess.from_dict(json.loads(json.dumps(Preprocess(size=64, resize="center-crop").to_dict()))).size == 64
    with pytest.raises(FedcbirError):
        Preprocess.from_dict({"size": 96, "colour": "yes"})
    with pytest.raises(FedcbirError):
        Preprocess(size=0)
    with pytest.raises(FedcbirError):
        Preprocess(resize="squash")
    with pytest.raises(FedcbirError):
        Preprocess(std=(0.2, 0.0, 0.2))


def test_pad_white_keeps_the_whole_product():
    im = Image.new("RGB", (100, 50), (255, 0, 0))
    out = to_uint8(im, 96)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    assert tuple(out[2, 48]) == (255, 255, 255) and tuple(out[93, 48]) == (255, 255, 255)
    assert tuple(out[48, 1]) == (255, 0, 0) and tuple(out[48, 94]) == (255, 0, 0)
    crop = to_uint8(im, Preprocess(size=32, resize="center-crop"))
    assert crop.shape == (32, 32, 3) and (crop[..., 0] == 255).all() and (crop[..., 1] == 0).all()
    assert to_uint8(im.convert("L"), Preprocess(size=20, resize="stretch")).shape == (20, 20, 3)


def test_normalize_and_preprocess_agree():
    im = Image.new("RGB", (10, 10), (255, 255, 255))
    x = preprocess(im)
    assert x.dtype == np.float32 and x.shape == (96, 96, 3)
    expected = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(x[0, 0], expected, atol=1e-5)
    batch = np.stack([to_uint8(im), to_uint8(im)])
    n = normalize(batch)
    assert n.shape == (2, 96, 96, 3) and n.dtype == np.float32
    assert np.array_equal(n[0], x)

"""Input images are checked by size, format and declared pixels before they are decoded."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from zimage_platform.errors import InvalidRequest
from zimage_platform.pipeline.images import ImageLimits, decode_image


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    image = decode_image(encode(Image.new("RGBA" if fmt != "JPEG" else "RGB", (40, 30), (1, 2, 3)), fmt))
    assert image.mode == "RGB" and image.size == (40, 30)


def code_of(*args) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        decode_image(*args)
    return err.value


def test_decompression_bomb_is_refused_by_its_declared_size():
    assert code_of(png_declaring(100_000, 100_000)).code == "image_too_many_pixels"


def test_other_refusals():
    assert code_of(b"x" * 100, ImageLimits(max_bytes=10)).code == "image_too_large"
    assert code_of(b"GIF89a not really").code == "image_unreadable"
    err = code_of(encode(Image.new("RGB", (4, 4)), "GIF"))
    assert err.code == "image_format_unsupported" and err.choices == ["PNG", "JPEG", "WEBP"]
    truncated = encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")[:60]
    assert code_of(truncated).code == "image_unreadable"

"""ComfyUI's ImageScale / ImageScaleBy on an uploaded image, done with Pillow before the job.

They run in the ingress (the image is small and already decoded there); the scaled image is
what the job stores as its input, so replicas and retries see the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable

from PIL import Image

from zimage_platform.workflows.compiler import ImageOp

RESAMPLING = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Crop to the target's aspect ratio around the centre (ComfyUI's ``crop: center``)."""
    w, h = image.size
    old, new = w / h, width / height
    x = y = 0
    if old > new:
        x = round((w - w * (new / old)) / 2)
    elif old < new:
        y = round((h - h * (old / new)) / 2)
    return image.crop((x, y, w - x, h - y)) if x or y else image


def apply(image: Image.Image, ops: Iterable[ImageOp]) -> Image.Image:
    for op in ops:
        if op.crop == "center":
            image = center_crop(image, op.width, op.height)
        if image.size != (op.width, op.height):
            image = image.resize((op.width, op.height), RESAMPLING[op.method])
    return image

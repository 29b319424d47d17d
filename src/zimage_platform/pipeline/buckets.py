"""Sizes: the resolution buckets engines are compiled for, and the rule for every other size.

A request names a size. The configured buckets are the fast path (a TensorRT profile each,
warmed up at start); any other size whose sides are multiples of 16, within the variant's
side limits and pixel limit, runs on the engines' dynamic-shape path and batches only with
requests of the same size. We never resize silently: a size outside the rule is refused with
the rule in the message and the buckets as the valid choices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zimage_platform.errors import InvalidRequest

#: Pixels per latent cell (VAE /8) times the transformer patch (2): every side is a multiple of 16.
SIZE_MULTIPLE = 16

#: The metrics label of every size outside the buckets.
DYNAMIC_LABEL = "dynamic"

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Resolution:
    width: int
    height: int

    @classmethod
    def parse(cls, text: str, *, param: str = "size") -> Resolution:
        match = _SIZE_RE.match(text)
        if not match:
            raise InvalidRequest(
                f"size {text!r} is not WIDTHxHEIGHT (e.g. 1024x1024)", code="invalid_size", param=param
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def megapixels(self) -> float:
        return self.pixels / 1_000_000

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(height, width) of the 16-channel latent."""
        return self.height // 8, self.width // 8

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class SizeRule:
    """Which sizes outside the buckets a variant accepts."""

    min_side: int = 64
    max_side: int = 2048
    max_pixels: int = 2048 * 2048

    def describe(self) -> str:
        return (
            f"width and height must be multiples of {SIZE_MULTIPLE} between {self.min_side} and "
            f"{self.max_side}, at most {self.max_pixels} pixels"
        )

    def allows(self, res: Resolution) -> bool:
        return (
            res.width % SIZE_MULTIPLE == 0
            and res.height % SIZE_MULTIPLE == 0
            and self.min_side <= res.width <= self.max_side
            and self.min_side <= res.height <= self.max_side
            and res.pixels <= self.max_pixels
        )


class BucketSet:
    """The configured buckets of one variant, in configuration order, and its size rule
    (``None``: the buckets only)."""

    def __init__(self, sizes: list[str] | list[Resolution], rule: SizeRule | None = None) -> None:
        buckets = [s if isinstance(s, Resolution) else Resolution.parse(s) for s in sizes]
        for b in buckets:
            if b.width % SIZE_MULTIPLE or b.height % SIZE_MULTIPLE:
                raise ValueError(f"bucket {b} is not a multiple of {SIZE_MULTIPLE} on both sides")
        if len(set(buckets)) != len(buckets):
            raise ValueError("duplicate resolution buckets")
        if not buckets:
            raise ValueError("at least one resolution bucket is required")
        self._buckets = buckets
        self.rule = rule

    def __iter__(self):
        return iter(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, item: object) -> bool:
        return item in self._buckets

    @property
    def names(self) -> list[str]:
        return [str(b) for b in self._buckets]

    def is_bucket(self, size: Resolution) -> bool:
        """A compiled bucket (the fast path), not a dynamic-shape size."""
        return size in self._buckets

    def label(self, size: Resolution | str) -> str:
        """``size`` as a metrics label: a bucket's name, or ``dynamic`` for every other size (so
        label values stay bounded however many sizes callers use)."""
        res = size if isinstance(size, Resolution) else Resolution.parse(size)
        return str(res) if res in self._buckets else DYNAMIC_LABEL

    def allows(self, size: Resolution) -> bool:
        return size in self._buckets or (self.rule is not None and self.rule.allows(size))

    def resolve(self, size: str | Resolution, *, param: str = "size") -> Resolution:
        """Return ``size`` when it is a bucket or fits the rule; refuse it otherwise, with the rule
        and the buckets."""
        res = size if isinstance(size, Resolution) else Resolution.parse(size, param=param)
        if not self.allows(res):
            rule = f": {self.rule.describe()} (the buckets are the fast path)" if self.rule else ""
            raise InvalidRequest(
                f"size {res} is not supported{rule}" if rule else f"size {res} is not a supported resolution bucket",
                code="unsupported_size",
                param=param,
                choices=self.names,
            )
        return res

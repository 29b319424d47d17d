"""Resolution buckets: the only sizes the engines are compiled for.

A request names a size; it must be one of the configured buckets. We never resize silently:
an unknown size is refused with the list of valid ones, so a client learns the contract once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zimage_platform.errors import InvalidRequest

#: Pixels per latent cell (VAE /8) times the transformer patch (2): every side is a multiple of 16.
SIZE_MULTIPLE = 16

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


class BucketSet:
    """The configured buckets of one variant, in configuration order."""

    def __init__(self, sizes: list[str] | list[Resolution]) -> None:
        buckets = [s if isinstance(s, Resolution) else Resolution.parse(s) for s in sizes]
        for b in buckets:
            if b.width % SIZE_MULTIPLE or b.height % SIZE_MULTIPLE:
                raise ValueError(f"bucket {b} is not a multiple of {SIZE_MULTIPLE} on both sides")
        if len(set(buckets)) != len(buckets):
            raise ValueError("duplicate resolution buckets")
        if not buckets:
            raise ValueError("at least one resolution bucket is required")
        self._buckets = buckets

    def __iter__(self):
        return iter(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, item: object) -> bool:
        return item in self._buckets

    @property
    def names(self) -> list[str]:
        return [str(b) for b in self._buckets]

    def resolve(self, size: str | Resolution, *, param: str = "size") -> Resolution:
        """Return the bucket for ``size`` or refuse it, listing the valid sizes."""
        res = size if isinstance(size, Resolution) else Resolution.parse(size, param=param)
        if res not in self._buckets:
            raise InvalidRequest(
                f"size {res} is not a supported resolution bucket",
                code="unsupported_size",
                param=param,
                choices=self.names,
            )
        return res

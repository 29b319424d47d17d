"""Outbound URLs chosen by callers (webhook targets, input-image URLs) must not reach our insides.

Outside the embedded default, a target has to be http(s) and resolve only to public addresses:
a tenant's URL must not become a way into the cluster (metadata service, databases, Ray).
Resolution happens when the URL is accepted *and* again right before each use, since DNS
answers can change in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from zimage_platform.errors import InvalidRequest


@dataclass(frozen=True)
class UrlPolicy:
    """What a refusal is called: ``code`` and ``param`` of the InvalidRequest it raises."""

    code: str
    param: str
    noun: str

    def invalid(self, url: str, why: str) -> InvalidRequest:
        return InvalidRequest(f"{self.noun} {url!r} is not allowed: {why}", code=self.code, param=self.param)

    def parse(self, url: str) -> tuple[str, int]:
        """Host and port of an http(s) URL without credentials, or InvalidRequest."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise self.invalid(url, f"cannot parse it ({exc})") from exc
        if parts.scheme not in ("http", "https"):
            raise self.invalid(url, "only http and https URLs are allowed")
        if not parts.hostname:
            raise self.invalid(url, "it has no host")
        if parts.username is not None or parts.password is not None:
            raise self.invalid(url, "credentials in the URL are not allowed")
        return parts.hostname, port or (443 if parts.scheme == "https" else 80)

    def check_public(self, url: str, host: str, addresses: Sequence[str]) -> None:
        """Every address the host resolves to must be public; one private answer is enough to refuse."""
        if not addresses:
            raise self.invalid(url, f"{host} does not resolve")
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_global:
                raise self.invalid(url, f"{host} resolves to a non-public address ({ip})")

    def validate(self, url: str, *, allow_private: bool = False) -> str:
        host, port = self.parse(url)
        if not allow_private:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise self.invalid(url, f"{host} does not resolve ({exc})") from exc
            self.check_public(url, host, _addresses(infos))
        return url

    async def validate_async(self, url: str, *, allow_private: bool = False) -> str:
        host, port = self.parse(url)
        if not allow_private:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise self.invalid(url, f"{host} does not resolve ({exc})") from exc
            self.check_public(url, host, _addresses(infos))
        return url


def _addresses(infos: Sequence[tuple[Any, ...]]) -> list[str]:
    return [info[4][0] for info in infos]


WEBHOOK_URLS = UrlPolicy(code="webhook_url_invalid", param="webhook_url", noun="webhook URL")
IMAGE_URLS = UrlPolicy(code="image_url_invalid", param="image_url", noun="image URL")

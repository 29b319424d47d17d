"""Outbound URLs chosen by callers (webhook targets, input-image URLs) must not reach our insides.

Outside the embedded default, a target has to be http(s) and resolve only to public addresses:
a tenant's URL must not become a way into the cluster (metadata service, databases, Ray).

Checking a name and then letting the HTTP client resolve it again to connect is not enough: a
DNS answer can change in between (DNS rebinding: public when checked, 127.0.0.1 when used). So
the clients built here resolve once per connection, check every address of that one answer, and
connect to a checked address; the Host header and the TLS SNI / certificate check still use the
name in the URL. :meth:`UrlPolicy.validate` stays as an early, friendly refusal at submission.

What a refusal or a failed fetch tells the caller is a reason code: never a resolved address,
the resolver's text, an exception's text or the target's body (an SSRF oracle otherwise).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from zimage_platform.errors import InvalidRequest

log = logging.getLogger(__name__)

#: Why a URL was refused (``reason`` of :class:`UrlError`).
REFUSAL_REASONS = ("unparsable", "scheme_not_allowed", "no_host", "credentials_in_url", "unresolvable", "not_public")
#: Why a fetch or delivery failed on the network (see :func:`failure_reason`).
FAILURE_REASONS = ("timeout", "tls_failed", "connect_failed", "protocol_error", "network_error")


class UrlError(InvalidRequest):
    """A caller's URL refused by policy or not reachable; ``reason`` (one of
    :data:`REFUSAL_REASONS`, :data:`FAILURE_REASONS` or ``http_status``) says why, for programs."""

    def __init__(
        self, message: str, *, code: str | None = None, param: str | None = None, reason: str = "not_public"
    ) -> None:
        super().__init__(message, code=code, param=param)
        self.reason = reason


@dataclass(frozen=True)
class UrlPolicy:
    """What a refusal is called: ``code`` and ``param`` of the InvalidRequest it raises."""

    code: str
    param: str
    noun: str

    def invalid(self, url: str, reason: str, why: str) -> UrlError:
        return UrlError(f"{self.noun} {url!r} is not allowed: {why}", code=self.code, param=self.param, reason=reason)

    def parse(self, url: str) -> tuple[str, int]:
        """Host and port of an http(s) URL without credentials, or :class:`UrlError`."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise self.invalid(url, "unparsable", "it cannot be parsed") from exc
        if parts.scheme not in ("http", "https"):
            raise self.invalid(url, "scheme_not_allowed", "only http and https URLs are allowed")
        if not parts.hostname:
            raise self.invalid(url, "no_host", "it has no host")
        if parts.username is not None or parts.password is not None:
            raise self.invalid(url, "credentials_in_url", "credentials in the URL are not allowed")
        return parts.hostname, port or (443 if parts.scheme == "https" else 80)

    def check_public(self, url: str, host: str, addresses: Sequence[str]) -> None:
        """Every address the host resolves to must be public; one private answer is enough to refuse.
        The message names neither the address nor the range (the caller may not learn our DNS)."""
        if not addresses:
            raise self.invalid(url, "unresolvable", f"{host} does not resolve")
        if not all(is_public(text) for text in addresses):
            raise self.invalid(url, "not_public", f"{host} resolves to a non-public address")

    async def addresses(self, url: str, host: str, port: int, *, allow_private: bool = False) -> list[str]:
        """One resolution of ``host``, every answer checked: the addresses to connect to."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.info("%s: %s does not resolve: %s", self.noun, host, exc)
            raise self.invalid(url, "unresolvable", f"{host} does not resolve") from exc
        found = list(dict.fromkeys(info[4][0] for info in infos))
        if not allow_private:
            self.check_public(url, host, found)
        return found

    def validate(self, url: str, *, allow_private: bool = False) -> str:
        """Early refusal (at submission): the connection checks again, see :meth:`client`."""
        host, port = self.parse(url)
        if not allow_private:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise self.invalid(url, "unresolvable", f"{host} does not resolve") from exc
            self.check_public(url, host, [info[4][0] for info in infos])
        return url

    async def validate_async(self, url: str, *, allow_private: bool = False) -> str:
        await self.addresses(url, *self.parse(url), allow_private=allow_private)
        return url

    def client(
        self,
        *,
        allow_private: bool = False,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits | None = None,
        **options: Any,
    ) -> httpx.AsyncClient:
        """An HTTP client whose every connection goes to an address checked by this policy.

        Redirects are not followed (they could lead anywhere) and proxy variables are ignored
        (a proxy would resolve the name again, unchecked). ``verify`` and ``limits`` configure
        the connection pool; other ``options`` go to ``httpx.AsyncClient``.
        """
        transport = httpx.AsyncHTTPTransport(verify=verify, **({"limits": limits} if limits else {}))
        # httpx has no public hook for the connection pool's network backend: set it on the pool.
        transport._pool._network_backend = PinnedBackend(self, allow_private=allow_private)
        return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False, **options)


def is_public(text: str) -> bool:
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to an address of one checked resolution of the host, never to the bare name."""

    def __init__(self, policy: UrlPolicy, *, allow_private: bool = False) -> None:
        self.policy = policy
        self.allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        url = f"//{host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.policy.addresses(url, host, port, allow_private=self.allow_private)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # addresses is never empty: getaddrinfo answers or raises
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def failure_reason(exc: BaseException) -> str:
    """A reason code (:data:`FAILURE_REASONS`) for a network failure, instead of its text."""
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError | ssl.CertificateError):
            return "tls_failed"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectError):
        return "connect_failed"
    if isinstance(exc, httpx.ProtocolError | httpx.DecodingError):
        return "protocol_error"
    return "network_error"


WEBHOOK_URLS = UrlPolicy(code="webhook_url_invalid", param="webhook_url", noun="webhook URL")
IMAGE_URLS = UrlPolicy(code="image_url_invalid", param="image_url", noun="image URL")

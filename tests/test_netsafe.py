"""Caller-chosen URLs (webhooks, input images) must not reach private networks in production."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zimage_platform.api.generation import fetch_image_url
from zimage_platform.errors import InvalidRequest
from zimage_platform.netsafe import IMAGE_URLS, WEBHOOK_URLS, UrlError, failure_reason
from zimage_platform.tenancy import TenantSpec


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost:9000/x",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/a",
        "http://[::1]/a",
        "http://0x7f.1/a",
        "file:///etc/passwd",
        "http://user:pw@1.1.1.1/a",
    ],
)
def test_private_and_odd_targets_are_refused(url):
    with pytest.raises(InvalidRequest) as err:
        IMAGE_URLS.validate(url)
    assert err.value.code == "image_url_invalid" and err.value.param == "image_url"


def test_public_addresses_pass_and_the_embedded_default_may_allow_loopback():
    assert IMAGE_URLS.validate("https://1.1.1.1/cat.png") == "https://1.1.1.1/cat.png"
    assert IMAGE_URLS.validate("http://127.0.0.1:8000/x.png", allow_private=True)
    with pytest.raises(InvalidRequest) as err:
        WEBHOOK_URLS.validate("http://192.168.1.1/hook")
    assert err.value.code == "webhook_url_invalid"


# -- DNS rebinding: one checked resolution per connection -----------------------------------------

PUBLIC = "93.184.216.34"


class Server:
    """A loopback HTTP(S) server that records every request it gets (and answers 500 with a body)."""

    def __init__(self, ssl: dict | None = None, status: int = 500) -> None:
        self.requests: list[dict] = []

        async def anything(request: Request) -> Response:
            self.requests.append({"path": request.url.path, "host": request.headers.get("host")})
            return Response(b"internal secret body", status_code=status)

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        app = Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST"])])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, **(ssl or {}))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def services(config):
    """The ingress's services as production builds them (private image URLs refused)."""
    from zimage_platform.serve.components import platform_services

    production = config.model_copy(update={"limits": config.limits.model_copy(update={"allow_private_urls": False})})
    built = platform_services(production, scheduler=None)
    yield built
    asyncio.run(built.http.aclose())


TENANT = TenantSpec(id="acme", display_name="Acme")


def test_an_image_url_rebound_to_loopback_after_the_check_never_reaches_loopback(services, dns, connects):
    answers, lookups = dns
    with Server() as server:
        answers["rebind.test"] = [PUBLIC, "127.0.0.1"]
        url = f"http://rebind.test:{server.port}/cat.png"
        with pytest.raises(UrlError) as err:
            asyncio.run(fetch_image_url(services, TENANT, url))
        assert server.requests == []
    # One lookup, and the one connection went to the address that lookup gave and was checked.
    assert lookups == ["rebind.test"] and connects == [(PUBLIC, server.port)]
    assert err.value.code == "image_url_unreachable" and err.value.reason == "connect_failed"
    assert "no route" not in err.value.message  # the exception's text stays with us


def test_a_private_answer_in_the_one_resolution_is_refused_before_connecting(services, dns, connects):
    answers, _ = dns
    answers["mixed.test"] = ["10.0.0.7"]
    with pytest.raises(UrlError) as err:
        asyncio.run(fetch_image_url(services, TENANT, "http://mixed.test/cat.png"))
    assert err.value.code == "image_url_invalid" and err.value.reason == "not_public"
    assert "10.0.0.7" not in err.value.message and connects == []


def test_fetch_errors_carry_a_reason_not_the_targets_text(dns):
    answers, _ = dns
    client = IMAGE_URLS.client(allow_private=True)
    services = SimpleNamespace(
        http=client, config=SimpleNamespace(limits=SimpleNamespace(max_input_image_bytes=1024, allow_private_urls=True))
    )
    with Server() as server:
        answers["loop.test"] = ["127.0.0.1"]
        with pytest.raises(UrlError) as err:
            asyncio.run(fetch_image_url(services, TENANT, f"http://loop.test:{server.port}/x.png"))
        assert err.value.reason == "http_status" and "secret" not in err.value.message
        assert server.requests == [{"path": "/x.png", "host": f"loop.test:{server.port}"}]  # Host: the name
    with pytest.raises(UrlError) as err:  # nothing listens there any more
        asyncio.run(fetch_image_url(services, TENANT, f"http://loop.test:{server.port}/x.png"))
    assert err.value.reason == "connect_failed" and err.value.code == "image_url_unreachable"
    assert "refused" not in err.value.message.lower() and "attempts" not in err.value.message


def test_https_to_a_pinned_address_keeps_sni_and_the_certificate_check(tmp_path, dns):
    """The connection goes to the checked IP, but TLS still names (and verifies) the host in the URL."""
    answers, _ = dns
    answers["secure.test"] = ["127.0.0.1"]
    ca_path, cert_path, key_path = self_signed(tmp_path, "secure.test")
    verify = ssl.create_default_context(cafile=str(ca_path))
    with Server(ssl={"ssl_certfile": str(cert_path), "ssl_keyfile": str(key_path)}, status=200) as server:

        async def get(url: str) -> int:
            async with IMAGE_URLS.client(allow_private=True, verify=verify) as client:
                return (await client.get(url)).status_code

        assert asyncio.run(get(f"https://secure.test:{server.port}/ok")) == 200
        assert server.requests == [{"path": "/ok", "host": f"secure.test:{server.port}"}]
        answers["other.test"] = ["127.0.0.1"]  # same address, a name the certificate does not cover
        with pytest.raises(httpx.ConnectError) as err:
            asyncio.run(get(f"https://other.test:{server.port}/ok"))
        assert failure_reason(err.value) == "tls_failed"


def self_signed(folder, name: str):
    """A certificate for ``name`` and the CA file that trusts it (the certificate itself)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, cert_path, key_path

"""Caller-chosen URLs (webhooks, input images) must not reach private networks in production."""

from __future__ import annotations

import pytest

from zimage_platform.errors import InvalidRequest
from zimage_platform.netsafe import IMAGE_URLS, WEBHOOK_URLS


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

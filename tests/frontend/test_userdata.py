"""The frontend's settings and user files per tenant, as ComfyUI's user routes answer them."""

from __future__ import annotations

import httpx
import pytest

from comfy_server import browser_client


@pytest.fixture(scope="module")
def acme(web_server, web_keys) -> httpx.Client:
    return browser_client(web_server, web_keys["acme"])


@pytest.fixture(scope="module")
def globex(web_server, web_keys) -> httpx.Client:
    return browser_client(web_server, web_keys["globex"])


def test_settings_are_per_tenant(acme, globex):
    assert acme.post("/api/settings", json={"Comfy.ColorPalette": "light", "Comfy.Locale": "en"}).status_code == 200
    assert acme.post("/api/settings/Comfy.ColorPalette", json="dark").status_code == 200
    assert acme.get("/api/settings").json() == {"Comfy.ColorPalette": "dark", "Comfy.Locale": "en"}
    assert acme.get("/settings/Comfy.ColorPalette").json() == "dark"  # bare routes too, as ComfyUI
    assert acme.get("/api/settings/Comfy.Unset").json() is None
    assert globex.get("/api/settings").json() == {}
    bad = acme.post("/api/settings", json=["not", "an", "object"])
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_settings"
    assert acme.get("/api/users").json() == {"storage": "server", "migrated": True}
    assert acme.post("/api/users", json={"username": "x"}).json()["error"]["type"] == "single_user"


def test_user_files(acme, globex):
    workflow = b'{"nodes": [], "links": []}'
    saved = acme.post("/api/userdata/workflows%2Fportrait.json", content=workflow)
    assert saved.status_code == 200 and saved.json() == "workflows/portrait.json"
    info = acme.post("/api/userdata/workflows%2Fdeep%2Fsub.json?full_info=true", content=b"{}").json()
    assert info["path"] == "workflows/deep/sub.json" and info["size"] == 2 and info["modified"] >= info["created"]
    again = acme.post("/api/userdata/workflows%2Fportrait.json?overwrite=false", content=b"{}")
    assert again.status_code == 409
    got = acme.get("/api/userdata/workflows%2Fportrait.json")
    assert got.content == workflow and got.headers["content-type"] == "application/json"

    assert acme.get("/api/userdata", params={"dir": "workflows"}).json() == ["portrait.json"]
    assert acme.get("/api/userdata", params={"dir": "workflows", "recurse": "true"}).json() == [
        "deep/sub.json",
        "portrait.json",
    ]
    assert acme.get("/api/userdata", params={"dir": "workflows", "recurse": "true", "split": "true"}).json() == [
        ["deep/sub.json", "deep", "sub.json"],
        ["portrait.json", "portrait.json"],
    ]
    (full,) = acme.get("/api/userdata", params={"dir": "workflows", "full_info": "true"}).json()
    assert full["path"] == "portrait.json" and full["size"] == len(workflow)
    assert acme.get("/api/userdata", params={"dir": "nothing"}).status_code == 404
    assert acme.get("/api/userdata").status_code == 400

    moved = acme.post("/api/userdata/workflows%2Fportrait.json/move/workflows%2Fshot.json?full_info=true")
    assert moved.status_code == 200 and moved.json()["path"] == "workflows/shot.json"
    assert acme.get("/api/userdata/workflows%2Fportrait.json").status_code == 404
    assert acme.post("/api/userdata/workflows%2Fgone.json/move/workflows%2Fx.json").status_code == 404
    acme.post("/api/userdata/workflows%2Fother.json", content=b"{}")
    clash = acme.post("/api/userdata/workflows%2Fother.json/move/workflows%2Fshot.json?overwrite=false")
    assert clash.status_code == 409

    # Another tenant has none of these.
    assert globex.get("/api/userdata", params={"dir": "workflows"}).status_code == 404
    assert globex.get("/api/userdata/workflows%2Fshot.json").status_code == 404
    assert globex.delete("/api/userdata/workflows%2Fshot.json").status_code == 404

    assert acme.delete("/api/userdata/workflows%2Fshot.json").status_code == 204
    assert acme.get("/api/userdata/workflows%2Fshot.json").status_code == 404


@pytest.mark.parametrize(
    "name",
    [
        "..%2Fglobex%2Fcomfy.settings.json",
        "%2Fetc%2Fpasswd",
        "workflows%2F..%2F..%2Fx",
        "a%5Cb.json",
        "a%00b",
        "%2E%2E",
    ],
)
def test_paths_stay_inside_the_tenant(acme, name):
    refused = acme.post(f"/api/userdata/{name}", content=b"{}")
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "invalid_path"
    assert acme.get(f"/api/userdata/{name}").status_code == 403


def test_size_caps(acme, web_config):
    limits = web_config.frontend
    too_big = acme.post("/api/userdata/big.bin", content=b"x" * (limits.userdata_max_file_bytes + 1))
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "userdata_quota_exceeded"
    chunk = b"y" * limits.userdata_max_file_bytes
    statuses = [acme.post(f"/api/userdata/fill%2F{i}.bin", content=chunk).status_code for i in range(3)]
    assert statuses == [200, 200, 413]  # 2 x 64 KiB fit in 160 KiB with the rest, a third does not
    assert acme.post("/api/userdata/fill%2F0.bin", content=b"small").status_code == 200  # replacing frees room
    statuses = [acme.post(f"/api/userdata/many%2F{i}.txt", content=b"1").status_code for i in range(20)]
    assert 413 in statuses and statuses.index(413) == statuses.count(200)  # the file count cap
    for i in range(3):
        acme.delete(f"/api/userdata/fill%2F{i}.bin")


def test_user_files_never_run_as_pages(web_server, web_keys):
    """A user file named .html or .svg is stored, but served as bytes: no upload runs as a page
    (with the session cookie) on the platform's origin."""
    initech = browser_client(web_server, web_keys["initech"])  # its user-file quota untouched
    page = b"<html><script>fetch('/api/settings')</script></html>"
    for name in ("page.html", "logo.svg", "tool.js"):
        assert initech.post(f"/api/userdata/files%2F{name}", content=page).status_code == 200
        got = initech.get(f"/api/userdata/files%2F{name}")
        assert got.content == page and got.headers["content-type"] == "application/octet-stream", name
        assert got.headers["x-content-type-options"] == "nosniff"
    assert initech.post("/api/userdata/files%2Fa.json", content=b"{}").status_code == 200
    assert initech.get("/api/userdata/files%2Fa.json").headers["content-type"] == "application/json"

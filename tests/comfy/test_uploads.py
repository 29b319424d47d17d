"""POST /upload/image (ComfyUI's naming rules, the platform's size and format limits), GET /view
of uploads, and LoadImage → (ImageScale) → VAEEncode → KSampler as image-to-image."""

from __future__ import annotations

import io
import json
import time

import comfy_client
import httpx
import pytest
from PIL import Image


def png(width: int, height: int, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def http(comfy_server, comfy_keys):
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": comfy_keys["acme"]}, timeout=60) as c:
        yield c


def upload(http, data: bytes, name: str = "in.png", **fields) -> httpx.Response:
    return http.post("/upload/image", files={"image": (name, data, "image/png")}, data=fields)


def test_names_follow_comfyui(http):
    first = upload(http, png(64, 64), "ref_upload.png", type="input", overwrite="true")
    assert first.status_code == 200 and first.json() == {"name": "ref_upload.png", "subfolder": "", "type": "input"}
    other = upload(http, png(64, 64, (0, 0, 255)), "ref_upload.png", type="input")
    assert other.json()["name"] == "ref_upload (1).png"  # another file, same name: renamed
    same = upload(http, png(64, 64), "ref_upload.png")
    assert same.json()["name"] == "ref_upload.png"  # the same bytes: the same file
    replaced = upload(http, png(64, 64, (0, 255, 0)), "ref_upload.png", overwrite="1")
    assert replaced.json()["name"] == "ref_upload.png"
    sub = upload(http, png(64, 64), "ref_upload_sub.png", subfolder="refsub")
    assert sub.json() == {"name": "ref_upload_sub.png", "subfolder": "refsub", "type": "input"}

    view = http.get("/view", params={"filename": "ref_upload.png", "type": "input", "subfolder": ""})
    assert view.status_code == 200 and view.content == png(64, 64, (0, 255, 0))
    assert http.get("/view", params={"filename": "ref_upload_sub.png", "subfolder": "refsub", "type": "input"}).content
    assert http.get("/view", params={"filename": "../etc/passwd", "type": "input"}).status_code == 400
    assert http.get("/view").status_code == 404
    listed = http.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"]
    assert {"ref_upload.png", "ref_upload (1).png", "refsub/ref_upload_sub.png"} <= set(listed[0])
    assert listed[1] == {"image_upload": True}


def test_limits_and_formats(http, comfy_config):
    missing = http.post("/upload/image", data={"type": "input"}, files={"other": ("x.txt", b"x")})
    assert missing.status_code == 400 and missing.json()["error"]["type"] == "image_missing"
    too_big = upload(http, b"\x89PNG" + bytes(comfy_config.limits.max_input_image_bytes + 10))
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "image_too_large"
    not_image = upload(http, b"this is not an image", "corrupt.png")
    assert not_image.status_code == 400 and not_image.json()["error"]["type"] == "image_unreadable"
    gif = upload(http, png(8, 8, fmt="GIF"), "anim.gif")
    body = gif.json()["error"]
    assert gif.status_code == 400 and body["type"] == "image_format_unsupported"
    assert body["extra_info"]["choices"] == ["PNG", "JPEG", "WEBP"]
    bomb = upload(http, png(4200, 4200, (0, 0, 0)), "huge.png")  # small file, 17.6 Mpx declared
    assert bomb.status_code == 400 and bomb.json()["error"]["type"] == "image_too_many_pixels"
    assert upload(http, png(8, 8), "../escape.png").status_code == 400
    assert upload(http, png(8, 8), "ok.png", subfolder="../up").status_code == 400
    assert upload(http, png(8, 8), "ok.png", type="models").status_code == 400
    # A refused upload leaves no file behind.
    names = http.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]
    assert not {"corrupt.png", "anim.gif", "huge.png", "ok.png"} & set(names)


def img2img_graph(image: str, *, scale: dict | None = None, denoise: float = 0.5) -> dict:
    prompt = json.loads(comfy_client.prompt_text)
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    pixels = ["20", 0]
    if scale is not None:
        prompt["21"] = {"class_type": "ImageScale", "inputs": {"image": ["20", 0], **scale}}
        pixels = ["21", 0]
    prompt["22"] = {"class_type": "VAEEncode", "inputs": {"pixels": pixels, "vae": ["4", 2]}}
    prompt["3"]["inputs"].update(latent_image=["22", 0], denoise=denoise)
    return prompt


def wait(http, prompt_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (history := http.get(f"/history/{prompt_id}").json()) == {}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return history[prompt_id]


def test_uploaded_image_to_image(http):
    name = upload(http, png(100, 80), "photo.png").json()["name"]
    # Not a bucket size and no scale: refused, with the sizes that would work.
    error = http.post("/prompt", json={"prompt": img2img_graph(name)}).json()["node_errors"]["20"]["errors"][0]
    assert error["extra_info"]["code"] == "unsupported_size" and "64x64" in error["extra_info"]["choices"]

    prompt = img2img_graph(name, scale={"upscale_method": "bicubic", "width": 64, "height": 64, "crop": "center"})
    answer = http.post("/prompt", json={"prompt": prompt}).json()
    assert answer["node_errors"] == {}
    entry = wait(http, answer["prompt_id"])
    assert entry["status"]["status_str"] == "success"
    image = http.get("/view", params=entry["outputs"]["9"]["images"][0]).content
    with Image.open(io.BytesIO(image)) as out:
        assert out.size == (64, 64)
    job = next(j for j in http.get("/v1/jobs").json()["data"] if j["kind"] == "edit")
    # ComfyUI's denoise 0.5 over 4 steps runs the last 4 of an 8-step schedule: the same here.
    assert job["params"]["steps"] == 8 and job["status"] == "succeeded"
    assert int(8 * job["params"]["strength"]) == 4

    unknown = http.post("/prompt", json={"prompt": img2img_graph("nope.png")}).json()
    error = unknown["node_errors"]["20"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and error["details"] == "image - Invalid image file: nope.png"


def test_another_tenants_upload_is_absent(comfy_server, comfy_keys, http):
    upload(http, png(64, 64, (9, 9, 9)), "private.png")
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": comfy_keys["globex"]}) as other:
        params = {"filename": "private.png", "type": "input"}
        assert other.get("/view", params=params).status_code == 404
        body = other.post("/prompt", json={"prompt": img2img_graph("private.png")}).json()
        assert body["node_errors"]["20"]["errors"][0]["details"] == "image - Invalid image file: private.png"


def test_every_intermediate_image_size_is_checked(http, comfy_config):
    """ImageScale / ImageScaleBy sizes are checked at validation against the image pixel limit,
    each one (a chain that scales up 8x and back down still makes the big image first)."""
    name = upload(http, png(1024, 768), "wide.png").json()["name"]
    limit = comfy_config.limits.max_input_image_pixels
    huge = img2img_graph(name, scale={"upscale_method": "lanczos", "width": 16384, "height": 16384, "crop": "disabled"})
    body = http.post("/prompt", json={"prompt": huge}).json()
    error = body["node_errors"]["21"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["code"] == "image_too_many_pixels"
    assert error["details"] == (
        f"width - this makes a 16384x16384 image (268435456 pixels); images in a workflow may have at most "
        f"{limit} pixels"
    )
    chain = img2img_graph(name, scale={"upscale_method": "bicubic", "width": 64, "height": 64, "crop": "disabled"})
    chain["23"] = {
        "class_type": "ImageScaleBy",
        "inputs": {"image": ["20", 0], "upscale_method": "area", "scale_by": 8},
    }
    chain["21"]["inputs"]["image"] = ["23", 0]
    error = http.post("/prompt", json={"prompt": chain}).json()["node_errors"]["23"]["errors"][0]
    assert error["extra_info"]["code"] == "image_too_many_pixels" and "8192x6144" in error["details"]


def test_image_work_runs_off_the_event_loop(http, monkeypatch):
    """Pillow work in the ComfyUI routes (decoding an upload; decoding, scaling and encoding it
    for a job; /view's preview conversion) happens in worker threads, never on the event loop."""
    import asyncio

    from zimage_platform.api import graphs
    from zimage_platform.api.comfy import api_router
    from zimage_platform.api.comfy import serving as comfy_serving

    seen: dict[str, list[str]] = {}

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                seen.setdefault(name, []).append("event loop")
            except RuntimeError:
                seen.setdefault(name, []).append("worker thread")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(graphs, "_scaled_png")
    spy(comfy_serving, "decode_image")
    spy(api_router, "convert_view")
    name = upload(http, png(128, 96, (1, 2, 3)), "scaled.png").json()["name"]
    prompt = img2img_graph(name, scale={"upscale_method": "lanczos", "width": 64, "height": 64, "crop": "center"})
    answer = http.post("/prompt", json={"prompt": prompt}).json()
    assert answer["node_errors"] == {}
    assert wait(http, answer["prompt_id"])["status"]["status_str"] == "success"
    assert http.get("/view", params={"filename": name, "type": "input", "preview": "webp;50"}).status_code == 200
    assert seen == {name: ["worker thread"] for name in ("decode_image", "_scaled_png", "convert_view")}

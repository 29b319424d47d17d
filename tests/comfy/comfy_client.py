"""A ComfyUI API client in the style of ComfyUI's ``script_examples/websockets_api_example.py``:
urllib for HTTP, ``websocket-client`` for the socket, a workflow with node ids "3"…"9".

Nothing platform-specific: the tests change only ``server_address`` (to
``127.0.0.1:<port>/comfy/<api-key>``, which carries the tenant's key for a client that cannot
add headers), exactly as a user points an existing script at the platform.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid

import websocket  # websocket-client

server_address = "127.0.0.1:8188"
client_id = str(uuid.uuid4())

# The classic API-format text-to-image graph, with the platform's model name and schedule.
prompt_text = """
{
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "cfg": 1,
            "denoise": 1,
            "latent_image": ["5", 0],
            "model": ["4", 0],
            "negative": ["7", 0],
            "positive": ["6", 0],
            "sampler_name": "euler",
            "scheduler": "simple",
            "seed": 8566257,
            "steps": 4
        }
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "z_image_turbo.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 64, "width": 64}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "masterpiece best quality girl"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
}
"""


def queue_prompt(prompt):
    p = {"prompt": prompt, "client_id": client_id}
    data = json.dumps(p).encode("utf-8")
    req = urllib.request.Request(f"http://{server_address}/prompt", data=data)
    return json.loads(urllib.request.urlopen(req).read())


def get_image(filename, subfolder, folder_type):
    data = {"filename": filename, "subfolder": subfolder, "type": folder_type}
    url_values = urllib.parse.urlencode(data)
    with urllib.request.urlopen(f"http://{server_address}/view?{url_values}") as response:
        return response.read()


def get_history(prompt_id):
    with urllib.request.urlopen(f"http://{server_address}/history/{prompt_id}") as response:
        return json.loads(response.read())


def get_images(ws, prompt, messages=None):
    """Queue ``prompt``, wait on the socket for its ``executing`` with ``node: null``, then
    download every output image named in its history. ``messages`` collects what arrived."""
    prompt_id = queue_prompt(prompt)["prompt_id"]
    output_images = {}
    while True:
        out = ws.recv()
        if isinstance(out, str):
            message = json.loads(out)
            if messages is not None:
                messages.append(message)
            if message["type"] == "executing":
                data = message["data"]
                if data["node"] is None and data["prompt_id"] == prompt_id:
                    break  # execution is done
        else:
            continue  # binary previews

    history = get_history(prompt_id)[prompt_id]
    for node_id in history["outputs"]:
        node_output = history["outputs"][node_id]
        images_output = []
        if "images" in node_output:
            for image in node_output["images"]:
                images_output.append(get_image(image["filename"], image["subfolder"], image["type"]))
        output_images[node_id] = images_output
    return output_images


def run(prompt_edits=None, messages=None):
    """What the example script does at the bottom: load the graph, set prompt and seed, connect,
    generate. Returns ``{node_id: [png bytes, ...]}``."""
    prompt = json.loads(prompt_text)
    prompt["6"]["inputs"]["text"] = "masterpiece best quality man"
    prompt["3"]["inputs"]["seed"] = 5
    for edit in prompt_edits or ():
        edit(prompt)
    ws = websocket.WebSocket()
    ws.connect(f"ws://{server_address}/ws?clientId={client_id}")
    try:
        return get_images(ws, prompt, messages)
    finally:
        ws.close()

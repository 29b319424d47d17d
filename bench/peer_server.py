"""A hand-rolled Z-Image server: what a competent user writes in an afternoon (``bench peer``'s peer).

Plain FastAPI + uvicorn + diffusers' own ``ZImagePipeline``, loaded as diffusers loads it; one
pipeline behind a lock, no batching, no compilation, torch threads at their default; an
OpenAI-images-like endpoint that answers with the PNG inline (``b64_json``). No auth, no
database, no object store, no queue: the baseline the platform's features cost against.

    python -m bench.peer_server --checkpoint var/checkpoints/tiny --port 8100

Benchmark code, not product code: nothing here is imported by the platform or by other benchmarks.
"""

from __future__ import annotations

import argparse
import base64
import io
import threading
import time

import torch
import uvicorn
from diffusers import ZImagePipeline
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel


class ImageRequest(BaseModel):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "1024x1024"
    response_format: str = "b64_json"
    seed: int | None = None
    steps: int = 8


def create_app(checkpoint: str) -> FastAPI:
    pipe = ZImagePipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()  # one generation at a time: the pipeline is not thread-safe
    app = FastAPI(title="hand-rolled Z-Image server")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/images/generations")
    def generate(request: ImageRequest) -> dict:
        try:
            width, height = (int(v) for v in request.size.split("x"))
        except ValueError:
            raise HTTPException(400, "size must be WIDTHxHEIGHT") from None
        if request.response_format != "b64_json":
            raise HTTPException(400, "only response_format b64_json is supported")
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        with lock:
            images = pipe(
                prompt=request.prompt,
                height=height,
                width=width,
                num_inference_steps=request.steps,
                guidance_scale=0.0,  # Turbo: no classifier-free guidance
                num_images_per_prompt=request.n,
                generator=generator,
            ).images
        data = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode()})
        return {"created": int(time.time()), "data": data}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="A diffusers Z-Image folder.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(create_app(args.checkpoint), host=args.host, port=args.port)


if __name__ == "__main__":
    main()

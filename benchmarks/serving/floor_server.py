"""The benchmark's floor: the least a Python server on this stack does per request.

uvicorn and a bare ASGI callable around the service's own parts: `decode_image` (Pillow), the `MicroBatcher`
and the ONNX Runtime model, configured from the same environment variables as the service (MODEL_URI, batching,
threads). No FastAPI, validation, auth, logs or metrics, and the multipart body is split by hand (it expects the
load generator's one-file request). Not a server to deploy: it shows how much of the distance between the
service and raw ONNX Runtime belongs to the machine, uvicorn and the decoder rather than to the service.
    MODEL_URI=model.onnx uvicorn benchmarks.serving.floor_server:app
"""

import json
from typing import Any

import numpy as np
from starlette.types import Receive, Scope, Send

from cifarlab_contract.drift import softmax
from serve.batching import Infer, MicroBatcher
from serve.middleware import send_json
from serve.model import LoadedModel, load_model
from serve.preprocess import decode_image
from serve.settings import load_settings

_state: dict[str, Any] = {}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["path"] == "/readyz":
        await send_json(send, 200, b'{"status": "ready"}')
    else:
        await _predict(receive, send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            settings = load_settings()
            model = load_model(str(settings.model_uri), settings)
            batcher = MicroBatcher(_infer_with(model), settings.max_batch_size, settings.max_wait_ms)
            batcher.start()
            _state.update(batcher=batcher, max_pixels=settings.max_image_pixels)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _state["batcher"].stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _infer_with(model: LoadedModel) -> Infer[None]:
    def infer(images: np.ndarray) -> tuple[np.ndarray, None]:
        return softmax(model.logits(images)), None

    return infer


async def _predict(receive: Receive, send: Send) -> None:
    batcher: MicroBatcher[None] = _state["batcher"]
    with batcher.arriving():
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        upload = body[body.index(b"\r\n\r\n") + 4 : body.rindex(b"\r\n--")]
        images = decode_image(upload, _state["max_pixels"])[None]
    probabilities, _ = await batcher.submit(images)
    best = int(probabilities[0].argmax())
    await send_json(send, 200, json.dumps({"class_index": best, "confidence": float(probabilities[0, best])}).encode())

"""The baseline the benchmark compares against: a server written the way tutorials write one.

FastAPI + PyTorch eager, one image per request, no batching, the model called on the event loop:
    BASELINE_NET=airbench BASELINE_WEIGHTS=weights.pt uvicorn benchmarks.serving.baseline_server:app
It imports torch and the training code, which the real service (serve/) never does.
"""

import io
import os

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from benchmarks.serving.nets import build
from cifarlab_contract.classes import CIFAR10_CLASSES

app = FastAPI()
model = build(os.environ.get("BASELINE_NET", "airbench"))
if os.environ.get("BASELINE_WEIGHTS"):
    model.load_state_dict(torch.load(os.environ["BASELINE_WEIGHTS"], weights_only=True))


@app.post("/predict")
async def predict(file: UploadFile = File(...)) -> dict:  # noqa: B008 - FastAPI's idiom
    image = Image.open(io.BytesIO(await file.read())).convert("RGB").resize((32, 32))
    # np.array, a writable copy: torch warns about (and may not write through) the read-only view Pillow gives
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy(np.array(image))[None]), dim=1)[0]
    index = int(probabilities.argmax())
    return {"label": CIFAR10_CLASSES[index], "confidence": float(probabilities[index])}

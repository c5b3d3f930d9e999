"""BentoML's peer of the serving benchmark: the same ONNX model on ONNX Runtime behind BentoML 1.4's adaptive
batcher, with the same session options, batch limit and decoder as the service, and BentoML's access log off.

Runs in its own virtual environment (make peer-venvs; BentoML 1.4 needs numpy 2), started by bench_serve.py:
    MODEL_URI=model.onnx build/peer-venvs/bentoml/bin/bentoml serve benchmarks.serving.peer_bentoml:Classifier
POST /predict takes one multipart field `images` with one JPEG (or several), as /v1/predict takes `files`, and
answers each image's best class and its probability.
"""

import os

import bentoml
import numpy as np
from PIL import Image

from benchmarks.serving.peer_common import MAX_BATCH_SIZE, open_session, probabilities
from serve.preprocess import RESAMPLE, SIZE

# BentoML refuses what it cannot answer within max_latency_ms; set past any wait of a throughput run so that it
# batches as much as the load allows and refuses nothing (the service has no latency objective either here).
MAX_LATENCY_MS = 10_000


def as_input(image: Image.Image) -> np.ndarray:
    """serve.preprocess.decode_image's steps after decoding (BentoML decodes the upload itself)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if rgb.size != SIZE:
        rgb = rgb.resize(SIZE, RESAMPLE)
    return np.asarray(rgb, dtype=np.uint8)


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self) -> None:
        self.session = open_session(os.environ["MODEL_URI"])

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, images: list[Image.Image]) -> list[dict]:
        answers = probabilities(self.session, np.stack([as_input(image) for image in images]))
        return [{"class_index": int(row.argmax()), "confidence": float(row.max())} for row in answers]

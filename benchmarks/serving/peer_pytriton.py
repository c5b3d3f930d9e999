"""Triton's peer of the serving benchmark: Triton Inference Server 2.51 through PyTriton 0.7, its dynamic batcher
in front of the same ONNX model on ONNX Runtime, with the service's session options, batch limit and decoder.

Runs in its own virtual environment (make peer-venvs; PyTriton 0.7 needs numpy < 2), started by bench_serve.py:
    MODEL_URI=model.onnx HTTP_PORT=8000 build/peer-venvs/pytriton/bin/python -m benchmarks.serving.peer_pytriton
Two models over the Open Inference Protocol (v2): `jpeg` takes the encoded image as a BYTES tensor [N, 1] (the
same upload as the other servers'), `images` the uint8 tensor [N, 32, 32, 3] as the service's /v2 does; both
answer `probabilities` FP32 [N, 10]. Triton's gRPC and metrics ports are the HTTP port + 1 and + 2.
"""

import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from benchmarks.serving.peer_common import MAX_BATCH_SIZE, MAX_PIXELS, MAX_WAIT_MS, open_session, probabilities
from serve.preprocess import decode_image


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # Triton's serve() loop ends on it and stops the server and its Python-backend stubs


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    session = open_session(os.environ["MODEL_URI"])

    @batch
    def infer_tensor(images: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": probabilities(session, images)}

    @batch
    def infer_jpeg(jpeg: np.ndarray) -> dict[str, np.ndarray]:
        images = np.stack([decode_image(bytes(blob[0]), MAX_PIXELS) for blob in jpeg])
        return {"probabilities": probabilities(session, images)}

    port = int(os.environ["HTTP_PORT"])
    config = TritonConfig(
        http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1", grpc_port=port + 1, metrics_port=port + 2
    )
    batcher = ModelConfig(
        max_batch_size=MAX_BATCH_SIZE, batcher=DynamicBatcher(max_queue_delay_microseconds=int(1000 * MAX_WAIT_MS))
    )
    output = [Tensor(name="probabilities", dtype=np.float32, shape=(10,))]
    with (
        tempfile.TemporaryDirectory(prefix="pytriton-") as workspace,
        Triton(config=config, workspace=Path(workspace) / "triton") as triton,
    ):
        triton.bind(
            "images", infer_tensor, [Tensor(name="images", dtype=np.uint8, shape=(32, 32, 3))], output, config=batcher
        )
        triton.bind("jpeg", infer_jpeg, [Tensor(name="jpeg", dtype=np.bytes_, shape=(1,))], output, config=batcher)
        triton.serve()
    sys.exit(0)


if __name__ == "__main__":
    main()

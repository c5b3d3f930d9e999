"""What the benchmark's peers (peer_bentoml.py, peer_pytriton.py) share with the service, so that each runs the
model as the service does: ONNX Runtime's session options, the batch limit, the softmax. Imports only numpy and
ONNX Runtime, which every peer's virtual environment has."""

import numpy as np
import onnxruntime as ort

MAX_BATCH_SIZE = 64  # the service's default max_batch_size
MAX_WAIT_MS = 2.0  # the service's default max_wait_ms: how long a batch may wait for requests arriving
MAX_PIXELS = 4096 * 4096  # the service's default max_image_pixels


def session_options() -> ort.SessionOptions:
    """The service's (serve.model.session_options) at its defaults: one thread per core, no spin-waiting."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def open_session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])


def probabilities(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Softmax of the model's logits for uint8 images [N, 32, 32, 3], as the service computes it."""
    logits = session.run(["logits"], {"images": images})[0]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)

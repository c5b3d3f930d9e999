# The inference service (serve/): FastAPI + ONNX Runtime, no torch, no training code.
#   make docker-build        docker build -t cifarlab-serve .
#   docker run -p 8000:8000 -v "$PWD/runs/<run id>/model.onnx:/models/model.onnx:ro" cifarlab-serve
# Feedback (POST /v1/feedback) needs a volume: -e FEEDBACK_DIR=/data/feedback -v cifarlab-feedback:/data/feedback
# A model baked in instead of mounted:
#   docker build --target baked --build-context model=runs/<run id> -t cifarlab-serve:<run id> .
ARG PYTHON_IMAGE=python:3.11-slim

# Dependencies only, from the hash-locked requirements: nothing unpinned or unverified gets in.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/serve.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-deps --require-hashes --only-binary=:all: -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --no-log-init --uid 10001 --no-create-home --shell /usr/sbin/nologin serve \
    && mkdir -p /data/feedback && chown 10001 /data/feedback
COPY --from=build /opt/venv /opt/venv
COPY serve/ /app/serve/
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_URI=/models/model.onnx
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
# uvicorn stops accepting on SIGTERM, finishes requests in flight, then the app drains its batch queue.
CMD ["uvicorn", "serve.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--no-access-log", "--timeout-graceful-shutdown", "20"]

# `--build-context model=<folder with model.onnx>` provides the `model` stage.
FROM runtime AS baked
# hadolint ignore=DL3022
COPY --from=model --chmod=0444 model.onnx /models/model.onnx

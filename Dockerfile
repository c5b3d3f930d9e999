# The inference service (serve/, and the contract it shares with training, src/cifarlab_contract/): FastAPI + ONNX
# Runtime on Debian's Python 3.11, no torch, no training code.
#   make docker-build        (downloads the locked wheels into build/wheels, then docker build -t cifarlab-serve .)
#   docker run -p 8000:8000 -v "$PWD/runs/<run id>/model.onnx:/models/model.onnx:ro" cifarlab-serve
# Feedback (POST /v1/feedback) needs a volume: -e FEEDBACK_DIR=/data/feedback -v cifarlab-feedback:/data/feedback
# A model baked in instead of mounted: make docker-build-baked (docker/release.Dockerfile). docs/delivery.md says
# why this base, and how the image is built where no registry is reachable.
ARG BASE_IMAGE=debian:bookworm-slim

# Debian's own Python: its security fixes arrive with the base's (apt), and build and runtime share this layer, so
# the virtual environment is made by the very interpreter that runs it.
FROM ${BASE_IMAGE} AS python
# Unpinned on purpose: Debian's archive keeps only the newest bookworm(-security) build, so a pinned version would
# stop building at the next security update; the base image's tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 \
    && rm -rf /var/lib/apt/lists/*

# Dependencies only, from the hash-locked requirements: nothing unpinned or unverified gets in. make docker-build
# puts the locked wheels in build/wheels and they are installed offline; without them (a bare `docker build .`)
# pip fetches the same hashes from its index. Left out, because the service never loads them: pip itself, the
# packages' own test suites, and ONNX Runtime's C API library (35 MB; its Python module links it neither at load
# time, per ldd, nor by name, and the image test serves a real prediction without it).
FROM python AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/serve.txt build/wheel[s] /tmp/requirements/
RUN python3.11 -m venv /opt/venv \
    && if ls /tmp/requirements/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/requirements; fi \
    && /opt/venv/bin/pip install --no-deps --require-hashes --only-binary=:all: -r /tmp/requirements/serve.txt \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
    && find /opt/venv -depth -type d -name tests -exec rm -rf {} + \
    && rm /opt/venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.*

FROM python AS runtime
RUN useradd --system --no-log-init --uid 10001 --no-create-home --shell /usr/sbin/nologin serve \
    && mkdir -p /data/feedback && chown 10001 /data/feedback
COPY --from=build /opt/venv /opt/venv
COPY src/cifarlab_contract/ /app/cifarlab_contract/
COPY serve/ /app/serve/
WORKDIR /app
# uvicorn reads UVICORN_HOST and UVICORN_PORT, so `docker run --network host -e UVICORN_PORT=...` picks the port.
# ONNX Runtime's usage telemetry is off: the service reports nothing to third parties (and, with no home directory
# to keep a device id in, ONNX Runtime would log a warning at every start).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_URI=/models/model.onnx \
    ORT_DISABLE_TELEMETRY=1 \
    UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8000
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ['UVICORN_PORT'], timeout=2)"]
# uvicorn stops accepting on SIGTERM, finishes requests in flight, then the app drains its batch queue.
CMD ["uvicorn", "serve.app:create_app", "--factory", "--no-access-log", "--timeout-graceful-shutdown", "20"]

# The serving image with its model inside. SERVE_IMAGE is ./Dockerfile's image: docker-bake.hcl hands it over as the
# `serve` context (target:serve); the plain builder (make docker-build-baked) names the image built by make docker-build.
ARG SERVE_IMAGE=serve
# hadolint ignore=DL3006
FROM ${SERVE_IMAGE}
COPY model.onnx /models/model.onnx

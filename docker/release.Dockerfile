# The serving image with its model inside: `serve` is ./Dockerfile's image (see docker-bake.hcl).
# hadolint ignore=DL3006
FROM serve
COPY model.onnx /models/model.onnx
ENV MODEL_URI=/models/model.onnx

#!/usr/bin/env bash
# Build the release image (docker-bake.hcl) and push it under tags that are never overwritten:
# sha-<commit> always, and the version when one is given. Usage: publish_image.sh IMAGE [VERSION]
set -euo pipefail

image=$(tr '[:upper:]' '[:lower:]' <<<"$1")  # registry paths are lowercase; GitHub owners may not be
version=${2:-}
version=${version#v}
tags="sha-$(git rev-parse HEAD)${version:+,$version}"

test -f build/release-model/model.onnx || {
    echo "error: build/release-model/model.onnx is missing; run make dvc-pull DVC_TARGETS=train release-model" >&2
    exit 1
}
for tag in ${tags//,/ }; do
    if docker buildx imagetools inspect "$image:$tag" >/dev/null 2>&1; then
        echo "error: $image:$tag already exists; release tags are immutable, tag a new version" >&2
        exit 1
    fi
done
IMAGE=$image TAGS=$tags docker buildx bake --file docker-bake.hcl --push release
echo "pushed $image with tags $tags"

#!/usr/bin/env bash
# Build the release image (docker-bake.hcl) and push it under tags that are never overwritten:
# sha-<commit> always, and the version when one is given. Usage: publish_image.sh IMAGE [VERSION]
# With buildx (CD): `docker buildx bake`, provenance and SBOM attached. Without it (an engine with the plain builder
# only, as Debian's docker.io): the same two images, ./Dockerfile's as SERVE_IMAGE and docker/release.Dockerfile's on
# top, built by `docker build` and pushed tag by tag, without provenance or SBOM. PUBLISH_BUILDER=plain picks that
# path where buildx exists too; BUILD_NETWORK (e.g. "--network host") is passed to its builds.
set -euo pipefail

fail() {
    echo "error: $*" >&2
    exit 1
}

image=$(tr '[:upper:]' '[:lower:]' <<<"$1")  # registry paths are lowercase; GitHub owners may not be
version=${2:-}
version=${version#v}
tags="sha-$(git rev-parse HEAD)${version:+,$version}"

test -f build/release-model/model.onnx ||
    fail "build/release-model/model.onnx is missing; run make dvc-pull DVC_TARGETS=train release-model"

builder=${PUBLISH_BUILDER:-$(docker buildx version >/dev/null 2>&1 && echo bake || echo plain)}
case $image in
    localhost[:/]* | 127.*) insecure=(--insecure) ;;  # a registry on loopback speaks plain HTTP
    *) insecure=() ;;
esac
if [ "$builder" = bake ]; then
    exists() { docker buildx imagetools inspect "$1" >/dev/null 2>&1; }
else
    exists() { docker manifest inspect "${insecure[@]}" "$1" >/dev/null 2>&1; }
fi
for tag in ${tags//,/ }; do
    if exists "$image:$tag"; then
        fail "$image:$tag already exists; release tags are immutable, tag a new version"
    fi
done

if [ "$builder" = bake ]; then
    IMAGE=$image TAGS=$tags docker buildx bake --file docker-bake.hcl --push release
    echo "pushed $image with tags $tags"
    exit 0
fi

serve=${SERVE_IMAGE:-cifarlab-serve}
read -r -a network <<<"${BUILD_NETWORK:-}"
first=${tags%%,*}
docker build "${network[@]}" -t "$serve" . || fail "building $serve (./Dockerfile) failed; nothing pushed"
docker build --build-arg "SERVE_IMAGE=$serve" -f docker/release.Dockerfile -t "$image:$first" build/release-model ||
    fail "building the release image (docker/release.Dockerfile) failed; nothing pushed"
for tag in ${tags//,/ }; do
    docker tag "$image:$first" "$image:$tag"
    output=$(docker push "$image:$tag" 2>&1) || fail "the registry refused $image:$tag: $(tail -n 1 <<<"$output")"
    echo "pushed $image:$tag $(grep -o 'digest: sha256:[0-9a-f]*' <<<"$output")"
done

# The release image (make docker-publish, cd.yml): the serving image built from ./Dockerfile, with the model
# that DVC pulled baked in. The model's context holds the model file alone, so nothing else (no credentials)
# can be copied into the image.
variable "IMAGE" {
  default = "cifarlab-serve"
}

# comma-separated, e.g. "sha-<commit>,1.2.0"
variable "TAGS" {
  default = "dev"
}

target "serve" {
  context    = "."
  dockerfile = "Dockerfile"
}

target "release" {
  context    = "build/release-model"
  dockerfile = "../../docker/release.Dockerfile"
  contexts = {
    serve = "target:serve"
  }
  tags   = [for tag in split(",", TAGS) : "${IMAGE}:${tag}"]
  attest = ["type=provenance,mode=max", "type=sbom"]
}

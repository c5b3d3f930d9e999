"""CD's release path (.github/workflows/cd.yml) rehearsed here, end to end and with real services on loopback: the
train stage's outputs come from a real `dvc repro` of the pipeline (pipeline_repo) pushed to the GCS emulator; a
fresh checkout of that commit then runs what CD's two jobs run (make dvc-pull DVC_TARGETS=train, make release-model,
make docker-publish) against a real registry, Debian's docker-registry (the CNCF distribution registry).

Not rehearsed: `docker buildx bake` and the provenance and SBOM it attaches (no buildx for Debian's docker.io:
publish_image.sh's plain-builder path builds the same two Dockerfiles with `docker build` and pushes tag by tag),
ghcr.io's login, and the workload-identity login to GCS (the emulator takes anonymous requests)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.containers import TEST_IMAGE, docker, error_lines, free_port, make
from tests.servers import REMOTE, Emulator, dvc, dvc_env, git

pytestmark = pytest.mark.integration  # a Docker engine and a loopback registry

VERSION = "v1.2.3"


def start_registry(root: Path, readonly: bool = False) -> tuple[str, subprocess.Popen]:
    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is not installed: make system-deps (Debian: apt-get install docker-registry)"
    address = f"127.0.0.1:{free_port()}"
    storage: dict = {"filesystem": {"rootdirectory": str(root / "data")}}
    if readonly:
        storage["maintenance"] = {"readonly": {"enabled": True}}
    config = root / "config.yml"
    config.write_text(
        yaml.safe_dump({"version": 0.1, "log": {"level": "warn"}, "storage": storage, "http": {"addr": address}})
    )
    process = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{address}/v2/", timeout=1):
                return address, process
        except OSError:
            assert process.poll() is None, f"docker-registry exited with {process.returncode}"
            time.sleep(0.1)
    process.kill()
    raise AssertionError("docker-registry did not answer in 30 s")


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A registry that takes pushes, and one in read-only mode that refuses them."""
    writable, writer = start_registry(tmp_path_factory.mktemp("registry"))
    readonly, reader = start_registry(tmp_path_factory.mktemp("readonly-registry"), readonly=True)
    yield {"writable": writable, "readonly": readonly}
    for process in (writer, reader):
        process.terminate()
        process.wait(10)


def cd_checkout(pipeline_repo: Path, dest: Path, gcs: Emulator) -> Path:
    """The commit CD builds: the pipeline's repository with its dvc.lock committed, cloned fresh (no DVC cache, no
    outputs), its remote pointed at the emulator as CD's login step points it at GCS."""
    subprocess.run(["git", "clone", "-q", str(pipeline_repo), str(dest)], check=True)
    shutil.copy2(pipeline_repo / "dvc.lock", dest / "dvc.lock")
    git(dest, "add", "dvc.lock")
    git(dest, "commit", "-q", "--allow-empty", "-m", "release: the dvc.lock of the pipeline's run")
    dvc(dest, "remote", "modify", "--local", REMOTE, "endpointurl", gcs.url)
    dvc(dest, "remote", "modify", "--local", REMOTE, "allow_anonymous_login", "true")
    # CD's install-locked step makes the job's venv; the suite's own venv stands in, and a clone's files are newer
    # than its install stamp, which would make `make` reinstall it
    for made_from in ("pyproject.toml", "requirements/train.txt"):
        os.utime(dest / made_from, (0, 0))
    return dest


def pushed_digests(output: str) -> dict[str, str]:
    """tag -> digest from publish_image.sh's `pushed IMAGE:TAG digest: sha256:...` lines."""
    return dict(re.findall(r"^pushed \S+:(\S+) digest: (sha256:[0-9a-f]{64})$", output, flags=re.MULTILINE))


def test_cd_release_path_pushes_immutable_tags_that_pull_back_identical(
    pipeline_repo: Path,
    gcs: Emulator,
    registries: dict[str, str],
    docker_engine: dict[str, str],
    tmp_path: Path,
    record_property,
    capsys,
) -> None:
    gcs.wipe()
    dvc(pipeline_repo, "push")  # the outputs CD pulls, stored by the pipeline's own run
    checkout = cd_checkout(pipeline_repo, tmp_path / "checkout", gcs)
    env = {
        **dvc_env(checkout),
        **docker_engine,
        "VENV": str(ROOT / ".venv"),
        "PUBLISH_BUILDER": "plain",  # the plain path even where buildx exists: bake cannot push to loopback here
    }

    pulled = make("dvc-pull", "DVC_TARGETS=train", cwd=checkout, env=env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    model = (checkout / "models" / "model.onnx").read_bytes()
    assert model == (pipeline_repo / "models" / "model.onnx").read_bytes()
    staged = make("release-model", cwd=checkout, env=env)
    assert staged.returncode == 0, staged.stderr
    assert (checkout / "build" / "release-model" / "model.onnx").read_bytes() == model
    assert sorted(path.name for path in (checkout / "build" / "release-model").iterdir()) == ["model.onnx"]

    image = f"{registries['writable']}/owner/cifarlab-serve"
    publish = ["docker-publish", f"RELEASE_IMAGE={image}", f"RELEASE_VERSION={VERSION}", f"SERVE_IMAGE={TEST_IMAGE}"]
    published = make(*publish, cwd=checkout, env=env, timeout=1800)
    assert published.returncode == 0, published.stdout[-3000:] + published.stderr[-3000:]
    commit = git(checkout, "rev-parse", "HEAD").strip()
    digests = pushed_digests(published.stdout)
    assert set(digests) == {f"sha-{commit}", VERSION.lstrip("v")}
    (digest,) = set(digests.values())  # one image under both tags
    record_property("pushed_digest", digest)
    manifest = json.loads(docker("manifest", "inspect", "--insecure", f"{image}@{digest}").stdout)
    stored = sum(layer["size"] for layer in manifest["layers"])  # compressed, as the registry stores the layers
    with capsys.disabled():
        print(f"\npushed {image}@{digest} as sha-{commit} and {VERSION.lstrip('v')}: {stored / 1e6:.0f} MB stored")

    for tag in digests:  # pulled back from the registry, not from the local cache
        docker("rmi", f"{image}:{tag}")
    for tag in digests:
        docker("pull", "--quiet", f"{image}:{tag}")
        assert f"{image}@{digest}" in docker("inspect", "--format", "{{json .RepoDigests}}", f"{image}:{tag}").stdout
    release = f"{image}:{VERSION.lstrip('v')}"
    baked = docker("run", "--rm", "--network", "none", "--entrypoint", "sha256sum", release, "/models/model.onnx")
    assert baked.stdout.split()[0] == hashlib.sha256(model).hexdigest()

    again = make(*publish, cwd=checkout, env=env, timeout=600)
    assert again.returncode != 0
    assert error_lines(again)[-1:] == [
        f"error: {image}:sha-{commit} already exists; release tags are immutable, tag a new version"
    ]

    refused_image = f"{registries['readonly']}/owner/cifarlab-serve"
    refused = make(
        "docker-publish", f"RELEASE_IMAGE={refused_image}", f"SERVE_IMAGE={TEST_IMAGE}", cwd=checkout, env=env
    )
    assert refused.returncode != 0
    assert error_lines(refused)[-1].startswith(f"error: the registry refused {refused_image}:sha-{commit}: ")

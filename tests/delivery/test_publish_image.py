"""scripts/publish_image.sh, the release push of cd.yml. No Docker engine or registry runs here, so a stand-in
`docker` on PATH records what the script asks of buildx and answers which tags the registry already has."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

FAKE_DOCKER = """#!/usr/bin/env bash
echo "$*" >>"$DOCKER_CALLS"
if [ "$1 $2 $3" = "buildx imagetools inspect" ]; then
    grep -qxF "$4" "$EXISTING_TAGS"  # exit 0 (the tag exists) only for tags listed there
    exit
fi
echo "IMAGE=$IMAGE TAGS=$TAGS" >>"$DOCKER_CALLS"
"""


@pytest.fixture
def publish(tmp_path: Path):
    """Run the script in a scratch repository (it reads the commit, and build/ of the folder it runs in)."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True)
    bin_dir.mkdir()
    shutil.copy(ROOT / "scripts" / "publish_image.sh", repo / "scripts")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "release"], cwd=repo, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    calls, existing = tmp_path / "calls.txt", tmp_path / "existing.txt"
    calls.write_text("")

    def _publish(*args: str, existing_tags: str = "", with_model: bool = True) -> tuple[int, str, list[str], str]:
        existing.write_text(existing_tags)
        if with_model:
            (repo / "build" / "release-model").mkdir(parents=True, exist_ok=True)
            (repo / "build" / "release-model" / "model.onnx").write_bytes(b"onnx")
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "DOCKER_CALLS": str(calls),
            "EXISTING_TAGS": str(existing),
        }
        result = subprocess.run(
            ["scripts/publish_image.sh", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=60
        )
        return result.returncode, result.stderr, calls.read_text().splitlines(), commit

    return _publish


def test_pushes_the_commit_and_version_tags_lowercased(publish) -> None:
    status, stderr, calls, commit = publish("ghcr.io/Owner/cifarlab-serve", "v1.2.0")
    assert status == 0, stderr
    image, tags = "ghcr.io/owner/cifarlab-serve", f"sha-{commit},1.2.0"
    assert calls[-2] == "buildx bake --file docker-bake.hcl --push release"
    assert calls[-1] == f"IMAGE={image} TAGS={tags}"


def test_refuses_to_overwrite_a_published_tag(publish) -> None:
    status, stderr, calls, _ = publish(
        "ghcr.io/owner/cifarlab-serve", "1.2.0", existing_tags="ghcr.io/owner/cifarlab-serve:1.2.0"
    )
    assert status == 1
    assert "ghcr.io/owner/cifarlab-serve:1.2.0 already exists" in stderr
    assert not [call for call in calls if call.startswith("buildx bake")]


def test_needs_the_pulled_model(publish) -> None:
    status, stderr, calls, _ = publish("cifarlab-serve", with_model=False)
    assert status == 1
    assert "build/release-model/model.onnx is missing" in stderr
    assert calls == []

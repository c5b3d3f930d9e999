"""The committed dvc.lock (made by `make dvc-lock`): well formed, the same pipeline as dvc.yaml, one consistent
`dvc repro` from a raw source the repository names, committed together with the reports it records.

What it does not check, on purpose: that the hashes of the code and config deps match today's tree. The lock
records what the released model was made from; requiring a match would force a retrain (minutes, and a new
model) on every change to the training code. `dvc status` shows that drift; docs/pipeline-lock.md says when to
regenerate."""

import hashlib
import re

import pytest
import yaml

from tests.conftest import ROOT, SAMPLE

STAGES: dict[str, dict] = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
LOCK_FILE = ROOT / "dvc.lock"
RAW_SOURCE = "data/raw/cifar10.tar.gz"
MD5 = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


def lock() -> dict:
    assert LOCK_FILE.is_file(), "dvc.lock is not committed: run make dvc-lock"
    return yaml.safe_load(LOCK_FILE.read_text())


def paths(entries: list) -> list[str]:
    """The paths of a dvc.yaml list of deps/outs, each a string or a one-key mapping to its options."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def declared_outs(stage: dict) -> set[str]:
    return {path for kind in ("outs", "metrics", "plots") for path in paths(stage.get(kind, []))}


def uncached_outs(stage: dict) -> set[str]:
    """The outs dvc.yaml keeps out of the DVC cache (`cache: false`): git holds them."""
    entries = [entry for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])]
    return {
        path
        for entry in entries
        if isinstance(entry, dict)
        for path, opts in entry.items()
        if (opts or {}).get("cache", True) is False
    }


def recorded(entries: list[dict]) -> dict[str, str]:
    """path -> md5 of a dvc.lock list of deps or outs."""
    return {entry["path"]: entry["md5"] for entry in entries}


def test_the_lock_is_dvc_2_schema_and_names_the_stages_of_dvc_yaml():
    locked = lock()
    assert locked["schema"] == "2.0"
    assert set(locked["stages"]) == set(STAGES), "dvc.yaml and dvc.lock name different stages: run make dvc-lock"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_locked_stage_records_what_dvc_yaml_declares(name: str):
    stage, locked = STAGES[name], lock()["stages"][name]
    assert " ".join(locked["cmd"].split()) == " ".join(stage["cmd"].split()), "the command changed: make dvc-lock"
    assert set(recorded(locked["deps"])) == set(stage["deps"]), "the deps changed: make dvc-lock"
    assert set(recorded(locked.get("outs", []))) == declared_outs(stage), "the outs changed: make dvc-lock"
    assert set(locked.get("params", {})) == set(paths(stage.get("params", [])))
    for entry in locked["deps"] + locked.get("outs", []):
        assert MD5.match(entry["md5"]) and entry["size"] >= 0, entry


def test_the_lock_is_one_consistent_repro():
    """Every dep that another stage produces carries the hash that stage recorded: no hand-merged lock."""
    stages = lock()["stages"]
    produced = {path: md5 for stage in stages.values() for path, md5 in recorded(stage.get("outs", [])).items()}
    for name, stage in stages.items():
        for path, md5 in recorded(stage["deps"]).items():
            assert produced.get(path, md5) == md5, f"{name}: {path} is not the output the lock records"


def test_the_pipeline_ran_on_a_raw_source_the_repository_names():
    """The committed sample (make dvc-lock), or the official archive data/raw/cifar10.tar.gz.dvc records."""
    (raw,) = [dep["md5"] for dep in lock()["stages"]["prepare"]["deps"] if dep["path"] == RAW_SOURCE]
    official = yaml.safe_load((ROOT / f"{RAW_SOURCE}.dvc").read_text())["outs"][0]["md5"]
    assert raw in {hashlib.md5(SAMPLE.read_bytes()).hexdigest(), official}


def test_the_reports_in_git_are_the_ones_the_lock_records():
    """Metrics and plots are kept in git (cache: false): committed with the lock that names them."""
    uncached = {
        path: md5
        for name, stage in lock()["stages"].items()
        for path, md5 in recorded(stage.get("outs", [])).items()
        if path in uncached_outs(STAGES[name])
    }
    assert uncached, "the evaluate stage records its reports"
    for path, md5 in uncached.items():
        assert (ROOT / path).is_file(), f"{path} is not committed: git add dvc.lock reports"
        assert hashlib.md5((ROOT / path).read_bytes()).hexdigest() == md5, f"{path} is not the one dvc.lock records"

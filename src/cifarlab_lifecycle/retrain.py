"""The retraining loop behind `make retrain`: labelled feedback in, a reviewed challenger out.

1. The inference service's feedback store (`<class>/<prediction id>.png` + their records, the format of
   cifarlab_contract.feedback), a folder or any fsspec URL (`gs://` where the replicas share it), is merged into
   `data/feedback`: new acknowledged images only, each written atomically, with their records as manifest lines.
2. `dvc add data/feedback` versions it; `dvc repro` reruns prepare (which adds it to the training split only),
   train and evaluate.
3. The new model and the registry's champion are scored on the same held-out test split; the model becomes a new
   `challenger` version only if it is no worse, and only if no version holds the same file already (with no new
   feedback, `dvc repro` leaves the model as it was) (`register_if_not_worse`). Promotion to champion stays a
   separate, reviewed step (scripts/promote.py).

The outcome is written to `summary_path` as JSON and returned as one line.
"""

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifarlab_contract.errors import UserError
from cifarlab_contract.feedback import MANIFEST_FILE, FeedbackSource, labelled_image_class, open_feedback_store
from cifarlab_contract.files import write_atomic
from cifarlab_lifecycle.registry import (
    aliased_or_none,
    register_onnx,
    registry_client,
    stamped,
    start_run,
    tag_version,
    version_holding,
)
from cifarlab_lifecycle.scoring import score_onnx, score_version

log = logging.getLogger(__name__)


def retrain(cfg: DictConfig) -> str:
    """Run the whole loop (module docstring); returns the one-line outcome."""
    root = Path(cfg.paths.root_dir)
    options = cfg.feedback_storage_options  # a mapping from the config, or null
    store = open_feedback_store(cfg.feedback_dir, OmegaConf.to_object(options) if options else None)  # type: ignore[arg-type]
    data = Path(cfg.feedback_data)
    champion_version(cfg)  # fails now, not after an hour of training, when the registry cannot be reached
    if not data.is_dir() and data.with_name(f"{data.name}.dvc").exists():
        raise UserError(f"{data} is tracked by DVC but not in the workspace: fetch it first (make dvc-pull)")
    new = merge_feedback(store, data, cfg.data.classes)
    run_dvc(root, "add", "--quiet", os.path.relpath(data, root))
    run_dvc(root, "repro")
    raw = Path(cfg.prepared_manifest).read_bytes()  # the prepared data the model was trained on
    manifest, data_sha256 = json.loads(raw), hashlib.sha256(raw).hexdigest()
    feedback = {
        "store": str(cfg.feedback_dir),
        "new": new,
        "in_training": manifest.get("extra_train", {}).get("count", 0),
    }
    decision = register_if_not_worse(
        cfg,
        Path(cfg.candidate),
        tags={"feedback_new": str(new), "feedback_in_training": str(feedback["in_training"]), "data": data_sha256},
    )
    summary: dict[str, Any] = {
        **asdict(decision),
        "model_name": cfg.model_name,
        "metric": cfg.metric,
        "tolerance": cfg.tolerance,
        "feedback": feedback,
        "train_images": manifest["splits"]["train"]["count"],
        "test_images": manifest["splits"]["test"]["count"],
        "data_manifest_sha256": data_sha256,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(Path(cfg.summary_path), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    merged = f"{new} new feedback image(s), {feedback['in_training']} in training"
    return f"{merged}; {decision.describe(cfg.model_name, cfg.metric, cfg.tolerance)}"


def merge_feedback(store: FeedbackSource, data: Path, classes: list[str]) -> int:
    """Copy the images of the store's records that `data` lacks (same `<class>/<name>`), each atomically, and
    append the records to `data`'s manifest; returns how many were new. Only acknowledged feedback is merged: an
    image without its record (a server killed between the two writes) is skipped and counted in the log. An
    unknown class stops it before any copy."""
    contents = store.contents()
    unknown = sorted({record.label for record in contents.records} - set(classes))
    if unknown:
        raise UserError(
            f"{store.url}: feedback for unknown class(es) {', '.join(unknown)} (classes: {', '.join(classes)})"
        )
    for member in contents.unreadable:
        log.warning("%s in %s is not a feedback record this version reads: skipped", member, store.url)
    acknowledged = {record.path: record for record in contents.records if labelled_image_class(record.path)}
    unrecorded = [m for m in contents.files if labelled_image_class(m) and m not in acknowledged]
    if unrecorded:
        log.warning("%d image(s) in %s have no record (never acknowledged): skipped", len(unrecorded), store.url)
    new = [path for path in acknowledged if not (data / path).exists()]
    for path in new:
        write_atomic(data / path, store.read(path))
    data.mkdir(parents=True, exist_ok=True)
    if new:
        manifest = data / MANIFEST_FILE
        lines = "".join(acknowledged[path].to_line() for path in new)
        write_atomic(manifest, (manifest.read_text() if manifest.exists() else "") + lines)
    return len(new)


def run_dvc(root: Path, *args: str) -> None:
    """Run DVC in `root`, its output shown as it comes; stages find this interpreter first on PATH."""
    if importlib.util.find_spec("dvc") is None:
        raise UserError("dvc is not installed: run `make venv` (the 'pipeline' extra of pyproject.toml)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, check=False)
    if result.returncode != 0:
        raise UserError(f"dvc {' '.join(args)} failed with exit status {result.returncode} (its output above says why)")


@dataclass(frozen=True)
class Registration:
    registered: bool
    version: str | None  # the candidate's new version, when registered
    champion_version: str | None  # None when there was no champion
    candidate_score: float | None  # None when the candidate was registered before (it is not scored again)
    champion_score: float | None
    existing_version: str | None = None  # the version that already holds the same ONNX file

    def describe(self, name: str, metric: str, tolerance: float) -> str:
        if self.existing_version is not None:
            return f"did not register the candidate: {name} version {self.existing_version} is the same ONNX file"
        candidate = f"candidate ({metric} {self.candidate_score:.4f})"
        if self.champion_version is None:
            return f"registered the {candidate} as {name} version {self.version} (challenger): there is no champion"
        champion = f"champion version {self.champion_version} ({metric} {self.champion_score:.4f})"
        if self.registered:
            return (
                f"registered the {candidate} as {name} version {self.version} (challenger): "
                f"not worse than the {champion} by more than {tolerance}"
            )
        return f"did not register the {candidate}: worse than the {champion} by more than {tolerance}"


def champion_version(cfg: DictConfig) -> str | None:
    """The version `cfg.champion_alias` points to (None if none does); fails when the registry is unreachable."""
    version = aliased_or_none(registry_client(cfg), cfg.model_name, cfg.champion_alias)
    return None if version is None else str(version.version)


def register_if_not_worse(cfg: DictConfig, candidate: Path, tags: dict[str, str] | None = None) -> Registration:
    """Score the `candidate` ONNX file and the champion on the same test data (eval.py's code path); register the
    candidate as a new version aliased `cfg.challenger_alias` only if its `cfg.metric` is at least the champion's
    minus `cfg.tolerance` (no champion: always). A candidate that a version already holds (a retraining that found
    nothing new) is neither scored nor registered again. The champion alias is never moved: promotion is a
    separate, reviewed step. The decision and `tags` are recorded on an MLflow run named `retrain` (and on the new
    version)."""
    client = registry_client(cfg)
    champion = aliased_or_none(client, cfg.model_name, cfg.champion_alias)
    existing = version_holding(client, cfg.model_name, candidate)
    candidate_score: float | None = None
    champion_score: float | None = None
    registered = False
    if existing is None:
        candidate_score = score_onnx(cfg, candidate, f"the candidate {candidate}")
        champion_score = None if champion is None else score_version(cfg, champion)
        registered = champion_score is None or candidate_score >= champion_score - cfg.tolerance
    run_id = start_run(cfg.tracking_uri, cfg.experiment_name, "retrain")
    version = (
        register_onnx(cfg.tracking_uri, run_id, candidate, cfg.model_name, cfg.challenger_alias) if registered else None
    )
    decision = Registration(
        registered,
        version,
        None if champion is None else str(champion.version),
        candidate_score,
        champion_score,
        existing,
    )
    recorded = stamped(
        "retrain",
        {
            "decision": "registered" if registered else "unchanged" if existing else "rejected",
            "metric": cfg.metric,
            "tolerance": str(cfg.tolerance),
            "candidate_score": "none" if candidate_score is None else f"{candidate_score:.6f}",
            "existing_version": existing or "none",
            "champion_version": decision.champion_version or "none",
            "champion_score": "none" if champion_score is None else f"{champion_score:.6f}",
            **(tags or {}),
        },
    )
    for key, value in recorded.items():
        client.set_tag(run_id, key, value)
    if version is not None:
        tag_version(client, cfg.model_name, version, recorded)
    client.set_terminated(run_id, "FINISHED")
    log.info(decision.describe(cfg.model_name, cfg.metric, cfg.tolerance))
    return decision

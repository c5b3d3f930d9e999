"""Promotion in the MLflow model registry: the `challenger` version replaces the `champion` only if it scores
better on the same test data by a margin. Registration after retraining: a candidate model becomes a new
`challenger` version only if it scores no worse than the `champion` (scripts/retrain.py).

Every training run registers its ONNX export as a new version aliased `challenger` (cifarlab.tracking); the
inference service loads `models:/<name>@champion`. Both versions are evaluated by `cifarlab.evaluate`, the code
path of `eval.py`, and the decision (both scores, margin, who, when) is recorded as tags on the challenger
version. Anything that fails before the decision (a missing alias, an evaluation error) changes nothing.
"""

import getpass
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from cifarlab_contract.errors import UserError
from cifarlab_contract.files import file_sha256

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"  # the file mlflow.onnx.log_model writes inside the logged model
ONNX_SHA256_TAG = "onnx_sha256"  # on each registered version (cifarlab.tracking): its exported file's digest


class RegistryError(UserError):
    """The registry does not hold what the command needs (a model, an alias), or a version cannot be evaluated."""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    challenger_version: str
    champion_version: str | None  # the champion before the decision; None when there was none
    challenger_score: float
    champion_score: float | None

    def describe(self, name: str, metric: str, margin: float) -> str:
        challenger = f"{name} version {self.challenger_version} ({metric} {self.challenger_score:.4f})"
        if self.champion_version is None:
            return f"promoted {challenger} to champion: there was no champion yet"
        champion = f"version {self.champion_version} ({metric} {self.champion_score:.4f})"
        if self.promoted:
            return f"promoted {challenger} to champion, replacing {champion}: better by more than {margin}"
        return f"kept {champion} as champion: {challenger} is not better by more than {margin}"


def promote(cfg: DictConfig) -> Decision:
    """Evaluate `cfg.challenger_alias` against `cfg.champion_alias` of `cfg.model_name` and move the champion
    alias to the challenger if its `cfg.metric` exceeds the champion's by more than `cfg.margin`."""
    client = _client(cfg)
    challenger = _aliased(client, cfg.model_name, cfg.challenger_alias, cfg.tracking_uri)
    champion = _aliased_or_none(client, cfg.model_name, cfg.champion_alias)
    if champion is not None and champion.version == challenger.version:
        raise RegistryError(
            f"{cfg.model_name} version {challenger.version} is already both {cfg.challenger_alias} and "
            f"{cfg.champion_alias}: nothing to compare (train a new model, or point {cfg.challenger_alias} elsewhere)"
        )
    challenger_score = _score(cfg, challenger)
    champion_score = None if champion is None else _score(cfg, champion)
    promoted = champion_score is None or challenger_score > champion_score + cfg.margin
    champion_version = None if champion is None else str(champion.version)
    decision = Decision(promoted, challenger.version, champion_version, challenger_score, champion_score)
    if promoted:
        client.set_registered_model_alias(cfg.model_name, cfg.champion_alias, challenger.version)
    _record(client, cfg, decision)
    log.info(decision.describe(cfg.model_name, cfg.metric, cfg.margin))
    return decision


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
    version = _aliased_or_none(_client(cfg), cfg.model_name, cfg.champion_alias)
    return None if version is None else str(version.version)


def register_if_not_worse(cfg: DictConfig, candidate: Path, tags: dict[str, str] | None = None) -> Registration:
    """Score the `candidate` ONNX file and the champion on the same test data (eval.py's code path); register the
    candidate as a new version aliased `challenger` only if its `cfg.metric` is at least the champion's minus
    `cfg.tolerance` (no champion: always). A candidate that a version already holds (a retraining that found
    nothing new) is neither scored nor registered again. The champion alias is never moved: promotion is a
    separate, reviewed step. The decision and `tags` are recorded on an MLflow run named `retrain` (and on the new
    version)."""
    from cifarlab.tracking import log_run_end, mlflow_logger  # torch: see _score_onnx

    client = _client(cfg)
    champion = _aliased_or_none(client, cfg.model_name, cfg.champion_alias)
    existing = _version_holding(client, cfg.model_name, candidate)
    candidate_score: float | None = None
    champion_score: float | None = None
    registered = False
    if existing is None:
        candidate_score = _score_onnx(cfg, candidate, f"the candidate {candidate}")
        champion_score = None if champion is None else _score(cfg, champion)
        registered = champion_score is None or candidate_score >= champion_score - cfg.tolerance
    logger = mlflow_logger(
        cfg.tracking_uri,
        experiment_name=cfg.experiment_name,
        run_name="retrain",
        registered_model_name=cfg.model_name if registered else None,
    )
    version = log_run_end(logger, candidate.parent, candidate, None) if registered else None
    decision = Registration(
        registered,
        version,
        None if champion is None else str(champion.version),
        candidate_score,
        champion_score,
        existing,
    )
    recorded = _stamped(
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
        logger.experiment.set_tag(logger.run_id, key, value)
    if version is not None:
        _tag_version(client, cfg.model_name, version, recorded)
    logger.finalize("success")
    log.info(decision.describe(cfg.model_name, cfg.metric, cfg.tolerance))
    return decision


def _version_holding(client: MlflowClient, name: str, onnx_path: Path) -> str | None:
    """The version of `name` registered from a byte-identical ONNX file (by the tag tracking sets), if any."""
    digest = file_sha256(onnx_path)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as error:
        raise RegistryError(f"cannot read the registry at {client.tracking_uri}: {_first_line(error)}") from error
    return next((str(v.version) for v in versions if v.tags.get(ONNX_SHA256_TAG) == digest), None)


def _client(cfg: DictConfig) -> MlflowClient:
    if not cfg.get("model_name"):
        raise RegistryError("no registered model name: set model_name= (or logger.registered_model_name=)")
    return MlflowClient(tracking_uri=cfg.tracking_uri)


def _aliased(client: MlflowClient, name: str, alias: str, tracking_uri: str) -> ModelVersion:
    version = _aliased_or_none(client, name, alias)
    if version is None:
        raise RegistryError(
            f"no version of registered model {name!r} has the alias {alias!r} at {tracking_uri} "
            f"(training registers each new model as {alias!r} when logger.registered_model_name is set)"
        )
    return version


def _aliased_or_none(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise RegistryError(f"cannot read the registry at {client.tracking_uri}: {_first_line(error)}") from error


def _score(cfg: DictConfig, version: ModelVersion) -> float:
    """The version's `cfg.metric` on the configured test data, through eval.py's code path."""
    label = f"{version.name} version {version.version}"
    with tempfile.TemporaryDirectory(prefix="promote-") as folder:
        try:
            # The version's own artifact location, not a models:/ URI: MLflow resolves those against the global
            # registry URI rather than this client's.
            location = MlflowClient(cfg.tracking_uri).get_model_version_download_uri(version.name, version.version)
            model_dir = download_artifacts(artifact_uri=location, dst_path=folder, tracking_uri=cfg.tracking_uri)
        except Exception as error:  # whatever the cause, the decision cannot be made: report it, change nothing
            raise RegistryError(f"could not evaluate {label}, nothing was changed: {_first_line(error)}") from error
        return _score_onnx(cfg, Path(model_dir) / ONNX_FILE, label)


def _score_onnx(cfg: DictConfig, onnx_path: Path, label: str) -> float:
    """`cfg.metric` of an ONNX file on the configured test data."""
    from cifarlab.evaluate import evaluate  # torch loads only when a model is evaluated, not for a quick refusal

    with tempfile.TemporaryDirectory(prefix="score-") as folder:
        eval_cfg = OmegaConf.merge(
            cfg,
            {
                "ckpt_path": None,
                "onnx_path": str(onnx_path),
                "report_dir": None,
                "metrics_path": str(Path(folder) / "test_metrics.json"),
            },
        )
        try:
            summary = evaluate(cast(DictConfig, eval_cfg))
        except Exception as error:  # whatever the cause, the decision cannot be made: report it, change nothing
            raise RegistryError(f"could not evaluate {label}, nothing was changed: {_first_line(error)}") from error
    if cfg.metric not in summary:
        raise RegistryError(f"metric {cfg.metric!r} is not reported by evaluation; choose one of {sorted(summary)}")
    return float(summary[cfg.metric])


def promote_version(
    tracking_uri: str,
    name: str,
    version: str,
    evidence: Mapping[str, str],
    champion_alias: str,
    challenger_alias: str,
) -> str | None:
    """Move `champion_alias` of `name` to `version` on a decision made elsewhere (an online A/B test), and record
    it as `promotion.*` tags on that version: `evidence` plus the previous champion, who and when.

    `version` must be the one `challenger_alias` names, so that what was tested is what gets promoted. Returns the
    previous champion's version (None if there was none). A refusal changes nothing.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    challenger = _aliased(client, name, challenger_alias, tracking_uri)
    if str(challenger.version) != str(version):
        raise RegistryError(
            f"the tested challenger is {name} version {version}, but the registry's {challenger_alias!r} alias names "
            f"version {challenger.version}: nothing was promoted (test the version the alias names)"
        )
    champion = _aliased_or_none(client, name, champion_alias)
    previous = None if champion is None else str(champion.version)
    if previous == str(version):
        raise RegistryError(f"{name} version {version} is already {champion_alias!r}: nothing to promote")
    client.set_registered_model_alias(name, champion_alias, str(version))
    tags = _stamped("promotion", {"decision": "promoted", "champion_version": previous or "none", **evidence})
    _tag_version(client, name, str(version), tags)
    return previous


def _record(client: MlflowClient, cfg: DictConfig, decision: Decision) -> None:
    tags = _stamped(
        "promotion",
        {
            "decision": "promoted" if decision.promoted else "rejected",
            "metric": cfg.metric,
            "margin": str(cfg.margin),
            "challenger_score": f"{decision.challenger_score:.6f}",
            "champion_version": decision.champion_version or "none",
            "champion_score": "none" if decision.champion_score is None else f"{decision.champion_score:.6f}",
        },
    )
    _tag_version(client, cfg.model_name, decision.challenger_version, tags)


def _tag_version(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _stamped(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    """A decision's tags: `prefix.<key>`, plus who made it and when."""
    stamped = {**values, "by": _user(), "at": datetime.now(UTC).isoformat(timespec="seconds")}
    return {f"{prefix}.{key}": str(value) for key, value in stamped.items()}


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        return "unknown"

"""An ONNX model under the model contract (docs/model-contract.md): where it comes from, its session, its metadata."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cifarlab_contract.alias_history import AliasMove, alias_history
from cifarlab_contract.drift import InvalidReference, Reference
from cifarlab_contract.files import file_sha256
from cifarlab_contract.model import (
    CONTRACT_VERSION_KEY,
    DATA_MANIFEST_KEY,
    IMAGE_SHAPE,
    INPUT_DTYPE,
    INPUT_NAME,
    INPUT_SPEC_KEY,
    OUTPUT_NAME,
    OUTPUT_SPEC_KEY,
    RUN_ID_KEY,
    ContractError,
    metadata_classes,
)
from serve.settings import Settings

MLFLOW_SCHEMES = ("models:/", "runs:/")
HISTORY_SHOWN = 20  # the latest moves of an alias that a loaded model carries


class ModelLoadError(Exception):
    """The model could not be resolved, read or checked against the contract; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    name: str
    version: str | None
    alias_history: tuple[AliasMove, ...] = ()


@dataclass(frozen=True)
class LoadedModel:
    """One loaded, warmed-up model. Immutable: a reload builds a new one and swaps the reference."""

    session: ort.InferenceSession
    uri: str
    path: Path
    name: str
    version: str
    sha256: str
    classes: tuple[str, ...]
    metadata: dict[str, str]
    reference: Reference | None  # drift reference statistics, when the export embedded them
    loaded_at: float = field(default_factory=time.time)
    alias_history: tuple[AliasMove, ...] = ()  # the moves of a models:/<name>@<alias> URI's alias, oldest first

    @property
    def run_id(self) -> str:
        return self.metadata.get(RUN_ID_KEY, "")

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits float32 [N, classes] for uint8 images [N, 32, 32, 3]. Blocking: call it off the event loop."""
        outputs = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})
        return np.asarray(outputs[0], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "uri": self.uri,
            "sha256": self.sha256,
            "classes": list(self.classes),
            "input_spec": json.loads(self.metadata.get(INPUT_SPEC_KEY, "{}")),
            "output_spec": json.loads(self.metadata.get(OUTPUT_SPEC_KEY, "{}")),
            "contract_version": self.metadata.get(CONTRACT_VERSION_KEY, ""),
            "data_manifest_sha256": self.metadata.get(DATA_MANIFEST_KEY, ""),
            "drift_reference": self.reference is not None,
            "loaded_at": self.loaded_at,
            "alias_history": [asdict(move) for move in self.alias_history],
        }


def load_model(uri: str, settings: Settings) -> LoadedModel:
    """Resolve `uri`, open it in ONNX Runtime, check the contract and warm it up."""
    source = resolve(uri, settings)
    try:
        sha256 = file_sha256(source.path)
        # From the path, not the bytes: weights stored as external data (MLflow's ONNX flavour does that) are
        # found beside the file.
        session = ort.InferenceSession(str(source.path), session_options(settings), providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ModelLoadError(f"cannot load {uri} ({source.path}) in ONNX Runtime: {error}") from error
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    classes = _check_contract(session, metadata, uri)
    try:
        reference = Reference.from_metadata(metadata, classes, where=uri)
    except InvalidReference as error:
        raise ModelLoadError(str(error)) from error
    model = LoadedModel(
        session=session,
        uri=uri,
        path=source.path,
        name=source.name,
        version=source.version or sha256[:12],
        sha256=sha256,
        classes=classes,
        metadata=metadata,
        reference=reference,
        alias_history=source.alias_history,
    )
    warm_up(model, settings.max_batch_size)
    return model


def session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.ort_intra_op_threads
    options.inter_op_num_threads = 1
    spin = "1" if settings.ort_spin_wait else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


def warm_up(model: LoadedModel, max_batch_size: int) -> None:
    """Run the batch sizes the server will see first, so the first requests do not pay for allocation."""
    for batch in sorted({1, max_batch_size}):
        logits = model.logits(np.zeros((batch, *IMAGE_SHAPE), dtype=np.uint8))
        if logits.shape != (batch, len(model.classes)) or not np.isfinite(logits).all():
            raise ModelLoadError(f"{model.uri} gives logits of shape {logits.shape} (or non-finite) on a warm-up batch")


def resolve(uri: str, settings: Settings) -> ModelSource:
    """A local path as is; an MLflow URI downloaded through the MLflow client into its local cache."""
    if not uri.startswith(MLFLOW_SCHEMES):
        path = Path(uri)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {uri}")
        return ModelSource(path, settings.model_name, settings.model_version)
    return _resolve_mlflow(uri)


def _resolve_mlflow(uri: str) -> ModelSource:
    try:
        # Imported here: the image does not ship MLflow; only a models:/ or runs:/ URI needs it.
        import mlflow.artifacts
        from mlflow import MlflowClient
    except ImportError as error:
        raise ModelLoadError(
            f"{uri} is an MLflow URI, and MLflow is not installed: `pip install mlflow-skinny`, "
            "or mount the .onnx file and give its path"
        ) from error
    name, version, download = None, None, uri
    history: tuple[AliasMove, ...] = ()
    if uri.startswith("models:/"):
        name, _, ref = uri.removeprefix("models:/").partition("@")
        try:
            if ref:
                client = MlflowClient()
                version = client.get_model_version_by_alias(name, ref).version
                # resolved once: download that version, not the alias again (it may have moved meanwhile, and
                # the server would then serve one version's weights under another's number)
                download = f"models:/{name}/{version}"
                history = tuple(alias_history(client.get_registered_model(name).tags, ref)[-HISTORY_SHOWN:])
            else:
                name, _, version = name.partition("/")
        except Exception as error:
            raise ModelLoadError(f"cannot resolve {uri} in the MLflow registry: {error}") from error
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=download))
    except Exception as error:
        raise ModelLoadError(f"cannot download {uri} from MLflow: {error}") from error
    files = [local] if local.is_file() else sorted(local.rglob("*.onnx"))
    if len(files) != 1:
        raise ModelLoadError(f"{uri} holds {len(files)} .onnx files; expected exactly one")
    return ModelSource(files[0], name or files[0].stem, str(version) if version else None, history)


def _check_contract(session: ort.InferenceSession, metadata: dict[str, str], uri: str) -> tuple[str, ...]:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].type != f"tensor({INPUT_DTYPE})":
        raise ModelLoadError(
            f"{uri} does not take one {INPUT_DTYPE} input named {INPUT_NAME!r} (docs/model-contract.md)"
        )
    if list(inputs[0].shape[1:]) != list(IMAGE_SHAPE):
        shape = ", ".join(map(str, IMAGE_SHAPE))
        raise ModelLoadError(f"{uri} takes images of shape {inputs[0].shape}, the contract says [N, {shape}]")
    if OUTPUT_NAME not in [o.name for o in outputs]:
        raise ModelLoadError(f"{uri} has no output named {OUTPUT_NAME!r}")
    try:
        return metadata_classes(metadata)
    except ContractError as error:
        raise ModelLoadError(f"{uri} has {error}") from error

"""Publish a run's model to a fixed folder (what the DVC pipeline's train stage outputs): the best checkpoint,
the ONNX export and a model card, each written atomically, so `models/` always names the latest trained model
whatever its run id."""

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cifarlab_contract.files import write_atomic
from cifarlab_contract.model import DATA_MANIFEST_KEY, RUN_ID_KEY, metadata_classes

CHECKPOINT_NAME = "best.ckpt"
ONNX_NAME = "model.onnx"
CARD_NAME = "model_card.md"
CARD_PARAMS = ("model.net._target_", "model.net.widths", "optimizer._target_", "optimizer.lr", "trainer.max_epochs")


def publish_model(
    out_dir: Path,
    checkpoint: Path,
    onnx_path: Path,
    metadata: Mapping[str, str],
    params: Mapping[str, Any],
    test_metrics: Mapping[str, float],
    registered_version: str | None = None,
) -> list[Path]:
    """Copy `checkpoint` and `onnx_path` (whose ONNX metadata is `metadata`) into `out_dir` and write its model card
    from the run's `params` (the flattened config, as MLflow records it); return the three paths."""
    written = [out_dir / CHECKPOINT_NAME, out_dir / ONNX_NAME, out_dir / CARD_NAME]
    write_atomic(written[0], checkpoint.read_bytes())
    write_atomic(written[1], onnx_path.read_bytes())
    write_atomic(written[2], model_card(metadata, params, test_metrics, registered_version))
    return written


def model_card(
    metadata: Mapping[str, str],
    params: Mapping[str, Any],
    test_metrics: Mapping[str, float],
    registered_version: str | None,
) -> str:
    """A short Markdown model card: what the model is, where it came from, how well it does, how to call it."""
    classes = metadata_classes(metadata)
    name = params.get("logger.registered_model_name")
    registered = f"`{name}` version {registered_version}" if name and registered_version else "none"
    lines = [
        "# Model card: CIFAR-10 classifier",
        "",
        f"- Run: `{metadata[RUN_ID_KEY]}` (MLflow run id; the run folder is `runs/{metadata[RUN_ID_KEY]}/`)",
        f"- Registered model: {registered}",
        f"- Data: manifest sha256 `{metadata[DATA_MANIFEST_KEY]}`",
        f"- Published: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        "- Interface: ONNX, input `images` uint8 [N, 32, 32, 3] RGB, output `logits` float32 "
        f"[N, {len(classes)}] (docs/model-contract.md)",
        f"- Classes: {', '.join(classes)}",
        "",
        "## Recipe",
        "",
        *(f"- `{key}`: {params[key]}" for key in CARD_PARAMS if key in params),
        "",
        "## Test metrics",
        "",
    ]
    if test_metrics:
        lines += [
            f"accuracy {test_metrics['acc']:.4f}, macro F1 {test_metrics['f1_macro']:.4f}",
            "",
            "| class | precision | recall | f1 |",
            "|---|---|---|---|",
            *(
                f"| {c} | {test_metrics[f'precision/{c}']:.4f} | {test_metrics[f'recall/{c}']:.4f} "
                f"| {test_metrics[f'f1/{c}']:.4f} |"
                for c in classes
            ),
        ]
    else:
        lines.append("not tested (test=false)")
    lines += [
        "",
        "## Limits",
        "",
        "Trained and tested on 32x32 CIFAR-10 images; other image sizes or domains are out of scope.",
    ]
    return "\n".join(lines) + "\n"

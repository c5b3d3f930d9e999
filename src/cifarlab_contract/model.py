"""The model contract (docs/model-contract.md): one ONNX file, its input and output, and the metadata it carries.

Training writes models under it (cifarlab.export.onnx), the registry logs their signature from it, and the service
checks every model it loads against it.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

CONTRACT_VERSION = "1"
INPUT_NAME = "images"
INPUT_DTYPE = "uint8"
IMAGE_SHAPE = (32, 32, 3)  # height, width, RGB channels: the input is [N, 32, 32, 3]
OUTPUT_NAME = "logits"
OUTPUT_DTYPE = "float32"  # the output is [N, number of classes]

# keys of the ONNX file's metadata_props
CONTRACT_VERSION_KEY = "contract_version"
CLASSES_KEY = "classes"
RUN_ID_KEY = "run_id"
DATA_MANIFEST_KEY = "data_manifest_sha256"
INPUT_SPEC_KEY = "input_spec"
OUTPUT_SPEC_KEY = "output_spec"
REFERENCE_KEY = "drift_reference"  # optional: cifarlab_contract.drift.Reference as JSON


class ContractError(ValueError):
    """A model's metadata does not follow the contract."""


def input_spec() -> dict[str, Any]:
    height, width, channels = IMAGE_SHAPE
    return {
        "name": INPUT_NAME,
        "dtype": INPUT_DTYPE,
        "shape": ["N", height, width, channels],
        "layout": "NHWC",
        "color": "RGB",
    }


def output_spec(classes: int) -> dict[str, Any]:
    return {"name": OUTPUT_NAME, "dtype": OUTPUT_DTYPE, "shape": ["N", classes]}


def contract_metadata(class_names: Sequence[str], run_id: str, manifest_sha256: str, **extra: str) -> dict[str, str]:
    """The key/value strings stored in the ONNX file's metadata_props."""
    return {
        CONTRACT_VERSION_KEY: CONTRACT_VERSION,
        CLASSES_KEY: json.dumps(list(class_names)),
        RUN_ID_KEY: run_id,
        DATA_MANIFEST_KEY: manifest_sha256,
        INPUT_SPEC_KEY: json.dumps(input_spec()),
        OUTPUT_SPEC_KEY: json.dumps(output_spec(len(class_names))),
        **extra,
    }


def metadata_classes(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The class names a model's metadata lists, in output-column order; ContractError without a valid list."""
    try:
        classes = json.loads(metadata[CLASSES_KEY])
    except (KeyError, ValueError) as error:
        raise ContractError(f"no valid {CLASSES_KEY!r} metadata: not exported under the model contract") from error
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ContractError(f"an invalid {CLASSES_KEY!r} list: {classes!r}")
    return tuple(classes)

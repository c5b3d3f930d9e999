"""The feedback store's format: what the service writes when a client names an image's true label, and what
retraining and the A/B report read back.

    <root>/<label>/<request id>~<image index>.png   the image as the model saw it (a labelled image folder:
                                                    data preparation reads it as extra training images)
    <root>/manifest.jsonl                           one FeedbackRecord a line, appended
"""

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

MANIFEST_FILE = "manifest.jsonl"
# Request ids become file names: no separators, no leading dot (hidden files are skipped by data preparation).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
INDEX_SEPARATOR = "~"  # not allowed in request ids: `<request id>~<index>` names one image unambiguously
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the files a labelled image folder holds


def feedback_key(request_id: str, image_index: int = 0) -> str:
    """The id of one image of a request: cache key, record key and file name stem."""
    return f"{request_id}{INDEX_SEPARATOR}{image_index}"


def image_path(label: str, key: str) -> str:
    """Where the image of feedback `key` is stored, relative to the store's root."""
    return f"{label}/{key}.png"


def labelled_image_class(member: str) -> str | None:
    """The class of a `<class>/<image>` file of a labelled image folder (extra training images, the feedback
    store); None for anything else: hidden (temporary) files, a manifest, deeper files."""
    parts = PurePosixPath(member).parts
    if len(parts) != 2 or any(part.startswith(".") for part in parts):
        return None
    return parts[0] if parts[1].lower().endswith(IMAGE_SUFFIXES) else None


@dataclass(frozen=True)
class FeedbackRecord:
    """One manifest line: the true label of an image, what the answering model said, and what shadows said."""

    request_id: str
    label: str
    predicted: str
    correct: bool
    confidence: float
    variant: str
    version: str
    path: str  # relative to the store's root
    received_at: str
    image_index: int = 0
    shadows: dict[str, dict[str, str | bool]] = field(default_factory=dict)  # variant -> predicted, version, correct

    @property
    def key(self) -> str:
        return feedback_key(self.request_id, self.image_index)

    def to_line(self) -> str:
        """The record as one manifest line (JSON, newline-terminated)."""
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    def outcomes(self) -> Iterator[tuple[str, str, str]]:
        """(variant, version, predicted) of the answering variant, then of each shadow."""
        yield self.variant, self.version, self.predicted
        for variant, shadow in sorted(self.shadows.items()):
            yield variant, str(shadow["version"]), str(shadow["predicted"])


def read_manifest(path: Path) -> tuple[list[FeedbackRecord], int]:
    """The records of a feedback manifest up to the first torn or malformed line, and that line's byte offset."""
    data = path.read_bytes()
    records, good_end = [], 0
    for line in _lines(data):
        try:
            records.append(FeedbackRecord(**json.loads(line)))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
            break
        good_end += len(line)
    return records, good_end


def _lines(data: bytes) -> Iterator[bytes]:
    """Complete lines, newline included; an unterminated tail is not a complete line."""
    start = 0
    while (end := data.find(b"\n", start)) != -1:
        yield data[start : end + 1]
        start = end + 1

"""The feedback store's format: what the service writes when a client names an image's true label, and what
retraining and the A/B report read back.

    <root>/<label>/<prediction id>.png   the image as the model saw it (a labelled image folder: data preparation
                                         reads it as extra training images); stores written before prediction ids
                                         hold `<request id>~<image index>.png` instead
    <root>/manifest.jsonl                one FeedbackRecord a line, appended

Readers are forward compatible: a line with fields this version does not know is read without them, and a line
that does not parse at all is skipped and reported, never dropped from the file (`read_manifest`).
"""

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

MANIFEST_FILE = "manifest.jsonl"
# Request ids become file names: no separators, no leading dot (hidden files are skipped by data preparation).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# What the server issues for every answered image: 128 random bits, hex. Unguessable, and unique across replicas and
# restarts without any coordination (a collision among 10^12 ids has a chance of about 10^-15).
PREDICTION_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
INDEX_SEPARATOR = "~"  # not allowed in request ids: `<request id>~<index>` names one image unambiguously
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the files a labelled image folder holds


def new_prediction_id() -> str:
    """A fresh prediction id (PREDICTION_ID_PATTERN), from the operating system's random source."""
    return secrets.token_hex(16)


def feedback_key(request_id: str, image_index: int = 0) -> str:
    """The key of one image of a request in stores written before prediction ids (records without one)."""
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
    prediction_id: str = ""  # the server-issued id the feedback named; "" in records written before there were any

    @property
    def key(self) -> str:
        """The record's key in its store: its prediction id, or for an older record its request id and index."""
        return self.prediction_id or feedback_key(self.request_id, self.image_index)

    def to_line(self) -> str:
        """The record as one manifest line (JSON, newline-terminated)."""
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    def outcomes(self) -> Iterator[tuple[str, str, str]]:
        """(variant, version, predicted) of the answering variant, then of each shadow."""
        yield self.variant, self.version, self.predicted
        for variant, shadow in sorted(self.shadows.items()):
            yield variant, str(shadow["version"]), str(shadow["predicted"])


_FIELDS = frozenset(f.name for f in fields(FeedbackRecord))


def read_manifest(path: Path, skipped: list[int] | None = None) -> tuple[list[FeedbackRecord], int]:
    """The records of a feedback manifest, and the byte offset where its complete lines end.

    An unterminated last line is a torn append (never acknowledged: the server fsyncs the newline before it
    answers) and the only thing left out of the offset. Fields this version does not know (a store written by a
    newer server) are ignored. A complete line that is not a record is skipped, its 1-based number appended to
    `skipped`, and it stays inside the offset: whoever truncates at the offset keeps it on disk.
    """
    data = path.read_bytes()
    records, good_end = [], 0
    for number, line in enumerate(_lines(data), start=1):
        good_end += len(line)
        try:
            values = json.loads(line)
            records.append(FeedbackRecord(**{k: v for k, v in values.items() if k in _FIELDS}))
        except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError):
            if skipped is not None:
                skipped.append(number)
    return records, good_end


def _lines(data: bytes) -> Iterator[bytes]:
    """Complete lines, newline included; an unterminated tail is not a complete line."""
    start = 0
    while (end := data.find(b"\n", start)) != -1:
        yield data[start : end + 1]
        start = end + 1

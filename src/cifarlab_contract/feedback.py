"""The feedback store's format: what the service writes when a client names an image's true label, and what
retraining and the A/B report read back. A folder, or any fsspec URL (gs://bucket/feedback) that all replicas share:

    <root>/<label>/<prediction id>.png       the image as the model saw it (a labelled image folder: data
                                             preparation reads it as extra training images)
    <root>/records/<id[:2]>/<id>.json        one FeedbackRecord (JSON), created only if absent: the acknowledgement.
                                             An image without its record was never acknowledged and is not data.
    <root>/manifest.jsonl                    stores written before records were objects: one FeedbackRecord a line
                                             (images named `<request id>~<image index>.png` before prediction ids);
                                             read, never written

One object per record, rather than one appended manifest, because object stores cannot append and replicas write
without coordinating: "create only if absent" (a hard link in a folder, a generation precondition on GCS) makes
each prediction's feedback stored exactly once whichever replica takes it.

Readers are forward compatible: fields this version does not know are ignored, and a record that does not parse
is skipped and reported, never deleted.
"""

import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from cifarlab_contract.errors import UserError

MANIFEST_FILE = "manifest.jsonl"
RECORDS_DIR = "records"
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


def record_path(prediction_id: str) -> str:
    """Where the record of feedback on `prediction_id` is stored, relative to the store's root."""
    return f"{RECORDS_DIR}/{prediction_id[:2]}/{prediction_id}.json"


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


def parse_record(data: bytes) -> FeedbackRecord:
    """One record from its JSON (fields this version does not know are ignored); ValueError if it is none."""
    try:
        values = json.loads(data)
        return FeedbackRecord(**{k: v for k, v in values.items() if k in _FIELDS})
    except (json.JSONDecodeError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise ValueError(f"not a feedback record: {error}") from error


def read_manifest(path: Path, skipped: list[int] | None = None) -> tuple[list[FeedbackRecord], int]:
    """The records of a feedback manifest, and the byte offset where its complete lines end.

    An unterminated last line is a torn append (never acknowledged: the server fsyncs the newline before it
    answers) and the only thing left out of the offset. Fields this version does not know (a store written by a
    newer server) are ignored. A complete line that is not a record is skipped, its 1-based number appended to
    `skipped`, and it stays inside the offset: whoever truncates at the offset keeps it on disk.
    """
    return parse_manifest(path.read_bytes(), skipped)


def parse_manifest(data: bytes, skipped: list[int] | None = None) -> tuple[list[FeedbackRecord], int]:
    """`read_manifest` of a manifest's bytes (read from a folder or an object store)."""
    records, good_end = [], 0
    for number, line in enumerate(_lines(data), start=1):
        good_end += len(line)
        try:
            records.append(parse_record(line))
        except ValueError:
            if skipped is not None:
                skipped.append(number)
    return records, good_end


def _lines(data: bytes) -> Iterator[bytes]:
    """Complete lines, newline included; an unterminated tail is not a complete line."""
    start = 0
    while (end := data.find(b"\n", start)) != -1:
        yield data[start : end + 1]
        start = end + 1


@dataclass(frozen=True)
class StoreContents:
    """Everything a feedback store holds, as read once."""

    records: list[FeedbackRecord]  # legacy manifest lines first, then record objects by time received
    unreadable: list[str]  # record objects, and `manifest.jsonl:<line>`s, that are not records (left in place)
    files: list[str]  # every file below the root, relative, sorted
    torn_bytes: int  # of an unterminated last manifest line, ignored


@dataclass(frozen=True)
class FeedbackSource:
    """A feedback store on a filesystem: a local folder or an object-store prefix, through fsspec."""

    fs: Any  # fsspec.AbstractFileSystem
    root: str
    url: str

    @property
    def local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, member: str) -> str:
        return f"{self.root}/{member}"

    def files(self) -> list[str]:
        """Every file below the root, as a relative POSIX path, in sorted order."""
        return sorted(path[len(self.root) :].lstrip("/") for path in self.fs.find(self.root))

    def read(self, member: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(member)))

    def read_record(self, prediction_id: str) -> FeedbackRecord | None:
        """The stored record of feedback on `prediction_id`, or None; ValueError when it is not a record."""
        try:
            return parse_record(self.read(record_path(prediction_id)))
        except FileNotFoundError:
            return None

    def contents(self) -> StoreContents:
        files = self.files()
        records: list[FeedbackRecord] = []
        unreadable: list[str] = []
        torn = 0
        if MANIFEST_FILE in files:
            data, skipped = self.read(MANIFEST_FILE), list[int]()
            records, good_end = parse_manifest(data, skipped)
            unreadable += [f"{MANIFEST_FILE}:{number}" for number in skipped]
            torn = len(data) - good_end
        stored: list[FeedbackRecord] = []
        for member in files:
            if member.startswith(f"{RECORDS_DIR}/") and member.endswith(".json"):
                try:
                    stored.append(parse_record(self.read(member)))
                except ValueError:
                    unreadable.append(member)
        records += sorted(stored, key=lambda record: (record.received_at, record.key))
        return StoreContents(records, unreadable, files, torn)


def open_feedback_store(
    url: "str | os.PathLike[str] | None", storage_options: dict[str, Any] | None = None, *, create: bool = False
) -> FeedbackSource:
    """The feedback store at `url` (a folder, or an fsspec URL such as gs://bucket/feedback, opened with
    `storage_options`). Without `create`, a store that is not there is an error; UserError, with one readable line,
    for anything that stops it."""
    import fsspec  # type: ignore[import-untyped]  # here: the torch-free contract imports it only when used

    if not url:
        raise UserError("no feedback store given: set FEEDBACK_DIR or feedback_dir=<the service's feedback store>")
    url = os.path.expanduser(str(url))
    options = dict(storage_options or {})
    try:
        if fsspec.utils.get_protocol(url) in ("file", "local"):
            options.setdefault("auto_mkdir", True)  # folders appear as files are written, as on object stores
        fs, root = fsspec.core.url_to_fs(url, **options)
        found = fs.info(root)["type"] == "directory"
    except FileNotFoundError:
        found = False
    except Exception as error:  # an unknown protocol, missing credentials, an unreachable endpoint
        raise UserError(f"{url}: cannot read the feedback store: {error}") from error
    if not found and not create:
        what = "the service's FEEDBACK_DIR: <class>/<prediction id>.png images and their records"
        raise UserError(f"{url}: no such feedback folder ({what})")
    return FeedbackSource(fs, root.rstrip("/"), url)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)

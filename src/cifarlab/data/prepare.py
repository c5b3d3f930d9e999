"""Turn a CIFAR-10 source into verified uint8 arrays on disk, once, so training never decodes images.

Sources: the official ``cifar-10-python.tar.gz`` (pickled batches) or an image folder
(``train/<class>/*.jpg|png`` and ``test/<class>/...``, as a directory or a .tar/.tar.gz/.tgz/.zip archive,
optionally under one top-level folder). The format is detected from the members, not from the name.

The prepared folder holds ``{train,test}_{images,labels}.npy`` and a ``manifest.json`` recording where the
data came from and every array's sha256; the manifest's own sha256 is the dataset's identity. Each split is
stored in a seeded shuffled order (``shuffle_seed`` in the manifest), not grouped by class as sources list
their images, so that any leading slice of a split (``limit_val_batches``, ``limit_test_batches``) holds
every class in about its share. This module
uses numpy, Pillow and the standard library only, so it works without torch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tarfile
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image

from cifarlab.errors import DataError
from cifarlab_contract.classes import CIFAR10_CLASSES
from cifarlab_contract.feedback import IMAGE_SUFFIXES, labelled_image_class
from cifarlab_contract.files import atomic_destination, atomic_directory, file_sha256

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_ARCHIVE_NAME = "cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"

SOURCE_ENV_VAR = "CIFAR10_SOURCE"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2: splits stored shuffled (1 kept the source's by-class order)
SHUFFLE_SEED = 0  # the stored order is part of the dataset's identity: fixed, not the run's seed
IMAGE_SIZE = 32
SPLITS = ("train", "test")
ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels")
DOWNLOAD_TIMEOUT_S = 60

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_PY_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_PY_TEST = "test_batch"
_PY_META = "batches.meta"
_PY_MEMBERS = (*_PY_TRAIN, _PY_TEST, _PY_META)
_OUTPUT_FILES = frozenset({MANIFEST_NAME, *(f"{name}.npy" for name in ARRAY_NAMES)})
_REPREPARE = "re-run scripts/prepare_data.py (or delete the folder so it is prepared again)"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """One split's images (uint8 [N, 32, 32, 3], RGB, HWC) and labels (int64 [N], indices into classes)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class PreparedDataset:
    """A verified prepared dataset; ``manifest_sha256`` identifies it in training logs."""

    root: Path
    train: Split
    test: Split
    classes: tuple[str, ...]
    manifest: dict
    manifest_sha256: str


class FolderKey(NamedTuple):
    """Where an image-folder member sits: optional top-level folder, split and class."""

    prefix: str
    split: str
    class_name: str


# An entry of a source: its posix path inside the source and a reader for its bytes (None for a folder).
# Readers are called while the entry is current, which is what lets archives be read in one pass.
Entry = tuple[str, Callable[[], bytes] | None]


# ---------------------------------------------------------------------------------------------- public API


def source_slug(source: str | os.PathLike | None) -> str:
    """Folder name for a source's prepared copy, so different sources never overwrite each other."""
    if source is None or str(source) == OFFICIAL_URL:
        return OFFICIAL_ARCHIVE_NAME.removesuffix(".tar.gz")
    name = _url_basename(str(source)) if _is_url(source) else Path(source).expanduser().resolve().name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def prepare(
    source: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    classes: Sequence[str] | None = CIFAR10_CLASSES,
    url: str = OFFICIAL_URL,
    expected_md5: str | None = None,
    force: bool = False,
    extra_train: str | os.PathLike | None = None,
) -> PreparedDataset:
    """Decode ``source`` (path, URL, or None for ``url``) into ``out_dir``, atomically.

    ``classes`` must match the source's classes exactly (None accepts whatever the source has). An existing
    valid ``out_dir`` is replaced only with ``force``; a failing prepare never leaves partial output behind.
    ``extra_train``: a folder of ``<class>/*.png|jpg`` images (the inference service's feedback, say) added to
    the training split only, so the test split stays the held-out set models are compared on.
    """
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, force)
    if extra_train is not None and not Path(extra_train).is_dir():
        raise DataError(
            f"{extra_train}: no such directory (extra training images go in {extra_train}/<class>/*.png|jpg)"
        )
    location = _source_location(source, url)
    path = _download(location, out_dir.parent, expected_md5) if _is_url(location) else Path(location)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    sha256 = None if path.is_dir() else _verified_sha256(path, _expected_md5(path.name, expected_md5), str(path))
    log.info("preparing CIFAR-10 from %s into %s", location, out_dir)
    source_format, found_classes, train, test = _read_source(path, classes)
    extra: dict[str, dict] = {}
    if extra_train is not None:
        added, extra["extra_train"] = _read_extra_train(Path(extra_train), found_classes)
        train = Split(np.concatenate([train.images, added.images]), np.concatenate([train.labels, added.labels]))
    train, test = shuffled(train, SHUFFLE_SEED), shuffled(test, SHUFFLE_SEED)
    manifest = {
        "format_version": FORMAT_VERSION,
        "shuffle_seed": SHUFFLE_SEED,
        "source": None if source is None else str(source),
        "source_resolved": location,
        "source_sha256": sha256,
        "source_format": source_format,
        "classes": list(found_classes),
        "splits": {
            name: _split_summary(split, found_classes) for name, split in zip(SPLITS, (train, test), strict=True)
        },
        **extra,
    }
    return _write(out_dir, train, test, found_classes, manifest)


def load_prepared(out_dir: str | os.PathLike) -> PreparedDataset:
    """Load a prepared dataset, verifying the manifest, every array's sha256, shapes, dtypes and counts."""
    root = Path(out_dir).expanduser()
    manifest_path = root / MANIFEST_NAME
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{manifest_path} is missing, so {root} is not a prepared dataset; {_REPREPARE}") from None
    try:
        manifest = json.loads(raw)
        if manifest["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{manifest_path}: format_version {manifest['format_version']}, this version reads "
                f"{FORMAT_VERSION}; {_REPREPARE}"
            )
        classes = tuple(manifest["classes"])
        arrays = {name: _load_array(root, manifest["arrays"][name]) for name in ARRAY_NAMES}
        expected_splits = dict(manifest["splits"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_path} is malformed ({exc!r}); {_REPREPARE}") from None
    splits = {name: Split(arrays[f"{name}_images"], arrays[f"{name}_labels"]) for name in SPLITS}
    for name, split in splits.items():
        where = f"{root / name}_*.npy"
        try:
            _validate_split(split, classes, where)
        except DataError as exc:
            raise DataError(f"{exc}; {_REPREPARE}") from None
        if _split_summary(split, classes) != expected_splits.get(name):
            raise DataError(f"{where}: counts do not match {manifest_path}; {_REPREPARE}")
    return PreparedDataset(root, splits["train"], splits["test"], classes, manifest, hashlib.sha256(raw).hexdigest())


def ensure_prepared(
    source: str | os.PathLike | None,
    prepared_root: str | os.PathLike,
    *,
    classes: Sequence[str] | None = CIFAR10_CLASSES,
    url: str = OFFICIAL_URL,
    expected_md5: str | None = None,
) -> PreparedDataset:
    """Return the prepared copy of a source under ``prepared_root``, preparing it only when needed.

    ``source`` None means ``$CIFAR10_SOURCE``, else a download of ``url``. A valid copy prepared from the
    same source (and classes) is loaded without touching the source, so the source may since be gone. A
    source that is itself a prepared folder (it holds a manifest.json) is loaded directly.
    """
    if source is None:
        source = os.environ.get(SOURCE_ENV_VAR) or None
    if source is not None and not _is_url(source) and (Path(source).expanduser() / MANIFEST_NAME).is_file():
        # A prepared dataset given as the source (the DVC pipeline's prepare stage output): used as it is.
        existing = load_prepared(source)
        if classes is not None and existing.classes != tuple(classes):
            raise DataError(f"{source} holds classes {list(existing.classes)}, expected {list(classes)}")
        return existing
    out_dir = Path(prepared_root).expanduser() / source_slug(source)
    location = _source_location(source, url)
    if (out_dir / MANIFEST_NAME).is_file():
        try:
            existing = load_prepared(out_dir)
        except DataError as exc:
            log.warning("re-preparing %s: %s", out_dir, exc)
        else:
            same_classes = classes is None or existing.classes == tuple(classes)
            if existing.manifest.get("source_resolved") == location and same_classes:
                return existing
    return prepare(source, out_dir, classes=classes, url=url, expected_md5=expected_md5, force=True)


def shuffled(split: Split, seed: int) -> Split:
    """The split in the order of ``np.random.default_rng(seed).permutation``: how prepare stores it."""
    order = np.random.default_rng(seed).permutation(len(split.labels))
    return Split(split.images[order], split.labels[order])


def iter_entries(path: Path) -> Iterator[Entry]:
    """Every folder and regular file of a directory or archive, streamed in the source's own order."""
    if path.is_dir():
        yield from _iter_directory(path)
    elif tarfile.is_tarfile(path):  # before zip: is_zipfile can mistake compressed bytes for a zip trailer
        yield from _iter_tar(path)
    elif zipfile.is_zipfile(path):
        yield from _iter_zip(path)
    else:
        raise DataError(f"{path}: not a directory or a .tar/.tar.gz/.tgz/.zip archive")


def image_folder_key(member: str, is_dir: bool) -> FolderKey | None:
    """Locate a class folder or an image in the image-folder layout; None for anything else."""
    parts = PurePosixPath(member).parts
    if any(part.startswith(".") or part == "__MACOSX" for part in parts):
        return None
    if not is_dir:
        if not parts or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            return None
        parts = parts[:-1]
    if len(parts) not in (2, 3) or parts[-2] not in SPLITS:
        return None
    return FolderKey("/".join(parts[:-2]), parts[-2], parts[-1])


def describe_member(source: Path, member: str) -> str:
    """How errors name a member: a plain path for directories, ``member in archive`` for archives."""
    return str(source / member) if source.is_dir() else f"{member} in {source}"


# ------------------------------------------------------------------------------------------ reading sources


@dataclass
class _Scan:
    """What one streaming pass over a source found, for either format."""

    batches: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # basename -> (member, pickle)
    folders: dict[FolderKey, list[tuple[str, np.ndarray]]] = field(default_factory=dict)


def _read_source(path: Path, classes: Sequence[str] | None) -> tuple[str, tuple[str, ...], Split, Split]:
    """Detect the source's format from its members and decode it: (format, classes, train, test)."""
    scan = _scan(path)
    if scan.batches:
        return ("cifar-python", *_from_python_batches(scan, path, classes))
    if scan.folders:
        return ("image-folder", *_from_image_folder(scan, path, classes))
    raise DataError(
        f"{path}: no CIFAR-10 data found; expected the official cifar-10-batches-py/ pickles or an image "
        "folder with train/<class>/*.jpg|png and test/<class>/..."
    )


def _scan(path: Path) -> _Scan:
    """Stream the source once, decoding images as they pass so the archive is never extracted."""
    scan = _Scan()
    try:
        for member, read in iter_entries(path):
            basename = PurePosixPath(member).name
            key = image_folder_key(member, is_dir=read is None)
            if read is not None and basename in _PY_MEMBERS:
                scan.batches[basename] = (member, read())
            elif key is not None:
                images = scan.folders.setdefault(key, [])
                if read is not None:
                    images.append((member, decode_image(read(), describe_member(path, member))))
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); is the archive complete?") from None
    return scan


def _iter_directory(root: Path) -> Iterator[Entry]:
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        relative = Path(folder).relative_to(root)
        if relative.parts:
            yield relative.as_posix(), None
        for filename in sorted(filenames):
            yield (relative / filename).as_posix(), (Path(folder) / filename).read_bytes


def _iter_zip(path: Path) -> Iterator[Entry]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            yield info.filename, None if info.is_dir() else functools.partial(archive.read, info)


def _iter_tar(path: Path) -> Iterator[Entry]:
    # "r:*" reads members in order just like stream mode "r|*", but about 10x faster on many small members.
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isdir():
                yield member.name, None
            elif member.isfile():
                yield member.name, functools.partial(_read_member, archive, member)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:  # only regular files are read, and those always have contents
        raise DataError(f"{member.name}: not a regular file")
    return handle.read()


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode one JPEG/PNG to uint8 RGB [32, 32, 3]; other sizes are refused, never silently resized."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as image:
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                width, height = image.size
                raise DataError(
                    f"{where}: image is {width}x{height} pixels, expected {IMAGE_SIZE}x{IMAGE_SIZE} "
                    "(images are not resized; fix or remove the file)"
                )
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: not a readable JPEG/PNG image ({exc})") from None


def _from_image_folder(
    scan: _Scan, source: Path, classes: Sequence[str] | None
) -> tuple[tuple[str, ...], Split, Split]:
    prefixes = sorted({key.prefix for key in scan.folders})
    if len(prefixes) > 1:
        raise DataError(f"{source}: train/ and test/ found under several folders ({', '.join(prefixes)}); keep one")
    splits = []
    matched: tuple[str, ...] = ()
    for split in SPLITS:
        found = sorted(key.class_name for key in scan.folders if key.split == split)
        split_dir = describe_member(source, "/".join(filter(None, (prefixes[0], split))))
        if not found:
            raise DataError(f"{split_dir}: no class folders found (expected {split}/<class>/*.jpg|png)")
        # train's classes become what test must match, so the two splits always agree
        matched = _match_classes(found, matched or classes, split_dir)
        splits.append(_image_split(scan, source, FolderKey(prefixes[0], split, ""), matched))
    train, test = splits
    return matched, train, test


def _image_split(scan: _Scan, source: Path, split_key: FolderKey, classes: tuple[str, ...]) -> Split:
    """Stack one split: classes in ``classes`` order, images sorted by path within each class."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_name in enumerate(classes):
        key = split_key._replace(class_name=class_name)
        members = sorted(scan.folders[key], key=lambda item: item[0])
        if not members:
            folder = describe_member(source, "/".join(filter(None, key)))
            raise DataError(f"{folder}: empty class folder (no .jpg/.jpeg/.png images)")
        images.extend(image for _, image in members)
        labels.extend([label] * len(members))
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64))


def _read_extra_train(folder: Path, classes: tuple[str, ...]) -> tuple[Split, dict]:
    """The images of ``folder/<class>/`` (hidden files and anything else skipped) and their manifest entry:
    count, per-class counts and one sha256 over every image's path and content."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    digest = hashlib.sha256()
    for member, read in iter_entries(folder):
        class_name = labelled_image_class(member)
        if read is None or class_name is None:
            continue
        if class_name not in classes:
            raise DataError(
                f"{folder / class_name}: {class_name!r} is not a class of the source ({', '.join(classes)}); "
                "rename or remove the folder"
            )
        data = read()
        images.append(decode_image(data, str(folder / member)))
        labels.append(classes.index(class_name))
        digest.update(f"{member}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    split = Split(
        np.stack(images) if images else np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        np.asarray(labels, dtype=np.int64),
    )
    return split, {"path": str(folder), "sha256": digest.hexdigest(), **_split_summary(split, classes)}


def _from_python_batches(
    scan: _Scan, source: Path, classes: Sequence[str] | None
) -> tuple[tuple[str, ...], Split, Split]:
    missing = [name for name in _PY_MEMBERS if name not in scan.batches]
    if missing:
        raise DataError(f"{source}: looks like the official CIFAR-10 python archive but lacks {', '.join(missing)}")
    meta_member, meta_bytes = scan.batches[_PY_META]
    meta_where = describe_member(source, meta_member)
    try:
        names = [
            n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(meta_bytes, meta_where)[b"label_names"]
        ]
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_where}: no readable label_names ({exc!r})") from None
    matched = _match_classes(names, classes, meta_where)
    to_matched = np.asarray([matched.index(name) for name in names], dtype=np.int64)
    splits = []
    for batch_names in (_PY_TRAIN, (_PY_TEST,)):
        parts = [_python_batch(*scan.batches[name], source, names) for name in batch_names]
        labels = np.concatenate([part.labels for part in parts])
        splits.append(Split(np.concatenate([part.images for part in parts]), to_matched[labels]))
    train, test = splits
    return matched, train, test


def _python_batch(member: str, data: bytes, source: Path, names: Sequence[str]) -> Split:
    """One pickled batch: planar CHW rows [N, 3072] become HWC images, as decoded image files are."""
    where = describe_member(source, member)
    batch = _unpickle(data, where)
    try:
        images = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: not a CIFAR-10 batch ({exc!r})") from None
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != pixels:
        raise DataError(f"{where}: data must be uint8 [N, {pixels}], found {images.dtype} {list(images.shape)}")
    hwc = images.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    split = Split(np.ascontiguousarray(hwc), labels)
    _validate_split(split, names, where)
    return split


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The official batches are pickles; allowing only numpy's array rebuilders keeps a hostile file inert."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise DataError(f"{where}: not a readable CIFAR-10 pickle ({exc})") from None


def _match_classes(found: Sequence[str], expected: Sequence[str] | None, where: str) -> tuple[str, ...]:
    """The classes to use: ``expected`` when the source has exactly those, else what was found."""
    if expected is None:
        return tuple(found)
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    if missing:
        raise DataError(f"{where}: missing class(es) {', '.join(missing)} (expected: {', '.join(expected)})")
    if extra:
        raise DataError(f"{where}: unexpected class(es) {', '.join(extra)} (expected: {', '.join(expected)})")
    return tuple(expected)


def _validate_split(split: Split, classes: Sequence[str], where: str) -> None:
    """The one shape/dtype/label check, applied to freshly decoded and to loaded arrays alike."""
    images, labels = split.images, split.labels
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataError(f"{where}: images must be uint8 [N, 32, 32, 3], found {images.dtype} {list(images.shape)}")
    if labels.dtype != np.int64 or labels.shape != (len(images),):
        raise DataError(f"{where}: labels must be int64 [{len(images)}], found {labels.dtype} {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{where}: labels must lie in 0..{len(classes) - 1}, found {labels.min()}..{labels.max()}")


def _split_summary(split: Split, classes: Sequence[str]) -> dict:
    counts = np.bincount(split.labels, minlength=len(classes))
    return {"count": len(split.labels), "per_class": dict(zip(classes, counts.tolist(), strict=True))}


# ------------------------------------------------------------------------------------- sources and checksums


def _is_url(source: str | os.PathLike | None) -> bool:
    return isinstance(source, str) and urllib.parse.urlparse(source).scheme in (
        "http",
        "https",
        "ftp",
        "file",
    )


def _url_basename(url: str) -> str:
    return PurePosixPath(urllib.parse.urlparse(url).path).name


def _source_location(source: str | os.PathLike | None, url: str) -> str:
    """What a source resolves to (URL or absolute path): recorded in the manifest and matched on reuse."""
    if source is None:
        return url
    if _is_url(source):
        return str(source)
    return str(Path(source).expanduser().resolve())


def _expected_md5(file_name: str, expected_md5: str | None) -> str | None:
    """The official archive is always checked, by name; downloads of the official URL carry that name."""
    return expected_md5 or (OFFICIAL_MD5 if file_name == OFFICIAL_ARCHIVE_NAME else None)


def _verified_sha256(path: Path, expected_md5: str | None, label: str) -> str:
    """sha256 of an archive (for the manifest), after checking its md5 when one is expected."""
    digests = {"md5": hashlib.md5(usedforsecurity=False), "sha256": hashlib.sha256()}
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            for digest in digests.values():
                digest.update(chunk)
    md5 = digests["md5"].hexdigest()
    if expected_md5 is not None and md5 != expected_md5.lower():
        raise DataError(
            f"{label}: md5 {md5} does not match the expected {expected_md5}; the file is corrupt, "
            "incomplete or not the expected archive (delete it and fetch it again, or pass the right md5)"
        )
    return digests["sha256"].hexdigest()


def _download(url: str, dest_dir: Path, expected_md5: str | None) -> Path:
    """Fetch ``url`` into ``dest_dir``, kept for reuse; temp file, md5 check, then rename, so a file under
    the final name is always complete and verified."""
    dest = dest_dir / (_url_basename(url) or OFFICIAL_ARCHIVE_NAME)
    if dest.is_file():
        return dest
    with atomic_destination(dest) as tmp:
        try:
            with tmp.open("wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out, 1 << 20)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot download {url} ({exc}); use a local copy instead: set data.source=/path/to/"
                f"{OFFICIAL_ARCHIVE_NAME} (or an image-folder archive/directory with train/<class>/ and "
                f"test/<class>/), or export {SOURCE_ENV_VAR}=<the same path>, or get network access"
            ) from None
        _verified_sha256(tmp, _expected_md5(dest.name, expected_md5), f"{url} (downloaded)")
    return dest


# --------------------------------------------------------------------------------------------- writing output


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Fail before any work if ``out_dir`` could not be replaced: never clobber foreign or good data."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory; choose another output folder")
    foreign = sorted(entry.name for entry in out_dir.iterdir() if entry.name not in _OUTPUT_FILES)
    if foreign:
        raise DataError(
            f"{out_dir} holds files prepare did not write ({', '.join(foreign[:3])}); "
            "choose another output folder or empty it"
        )
    if not force and (out_dir / MANIFEST_NAME).is_file():
        try:
            load_prepared(out_dir)
        except DataError:
            return
        raise DataError(f"{out_dir} already holds a prepared dataset; pass --force (force=True) to replace it")


def _write(out_dir: Path, train: Split, test: Split, classes: tuple[str, ...], manifest: dict) -> PreparedDataset:
    """Write into a temporary sibling, then swap it in with renames: readers see old or new, never half."""
    with atomic_directory(out_dir) as tmp:
        arrays = dict(zip(ARRAY_NAMES, (train.images, train.labels, test.images, test.labels), strict=True))
        manifest = {
            **manifest,
            "arrays": {name: _save_array(tmp, name, array) for name, array in arrays.items()},
        }
        raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        (tmp / MANIFEST_NAME).write_bytes(raw)
    return PreparedDataset(out_dir, train, test, classes, manifest, hashlib.sha256(raw).hexdigest())


def _save_array(folder: Path, name: str, array: np.ndarray) -> dict:
    file_name = f"{name}.npy"
    np.save(folder / file_name, array, allow_pickle=False)
    sha256 = file_sha256(folder / file_name)
    return {"file": file_name, "shape": list(array.shape), "dtype": str(array.dtype), "sha256": sha256}


def _load_array(root: Path, entry: dict) -> np.ndarray:
    path = root / Path(entry["file"]).name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {_REPREPARE}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry["sha256"]:
        raise DataError(
            f"{path}: sha256 {actual} does not match the manifest's {entry['sha256']} "
            f"(corrupt or modified); {_REPREPARE}"
        )
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
        raise DataError(f"{path}: {array.dtype} {list(array.shape)} does not match the manifest; {_REPREPARE}")
    return array

"""prepare/load_prepared/ensure_prepared on tiny generated sources in both formats, plus the scripts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.data import sample
from cifarlab.data.prepare import (
    ARRAY_NAMES,
    CIFAR10_CLASSES,
    OFFICIAL_MD5,
    OFFICIAL_URL,
    SPLITS,
    Split,
    ensure_prepared,
    load_prepared,
    prepare,
    source_slug,
)
from cifarlab.errors import DataError
from tests.conftest import ROOT

REPO = ROOT
UNREACHABLE_URL = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: nothing listens there
TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


# --------------------------------------------------------------------------------------------- fixtures


def random_images(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def build_image_folder(root: Path, classes: tuple[str, ...] = CIFAR10_CLASSES, seed: int = 0) -> dict[str, Split]:
    """A PNG image folder (exact pixels); returns each split as prepare orders it: by class, then name."""
    rng = np.random.default_rng(seed)
    expected = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images = random_images(rng, per_class * len(classes))
        for index, pixels in enumerate(images):
            label, position = divmod(index, per_class)
            write_png(root / split / classes[label] / f"{position:04d}.png", pixels)
        expected[split] = Split(images, np.repeat(np.arange(len(classes), dtype=np.int64), per_class))
    return expected


def archive_folder(folder: Path, archive: Path, top: str | None = None) -> Path:
    """Pack ``folder``, optionally under one top-level folder, as .zip, .tar.gz or .tar (by suffix)."""
    prefix = f"{top}/" if top else ""
    paths = sorted(folder.rglob("*"))
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as out:
            for path in paths:
                out.write(path, prefix + path.relative_to(folder).as_posix())
    else:
        with tarfile.open(archive, "w:gz" if archive.name.endswith(".gz") else "w") as out:
            for path in paths:
                out.add(path, prefix + path.relative_to(folder).as_posix(), recursive=False)
    return archive


def planar(images: np.ndarray) -> np.ndarray:
    """HWC images as rows of the official format: 1024 R values, then 1024 G, then 1024 B."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_python_archive(
    path: Path, train_rows: np.ndarray, train_labels, test_rows: np.ndarray, test_labels, skip: str = ""
) -> Path:
    """Laid out like the official cifar-10-python.tar.gz: 5 train batches, test batch, meta (protocol 2)."""
    members = {"batches.meta": {b"label_names": [name.encode() for name in CIFAR10_CLASSES]}}
    batches = zip(np.array_split(train_rows, 5), np.array_split(np.asarray(train_labels), 5), strict=True)
    for index, (rows, labels) in enumerate(batches, start=1):
        members[f"data_batch_{index}"] = {b"data": rows, b"labels": labels.tolist()}
    members["test_batch"] = {b"data": test_rows, b"labels": np.asarray(test_labels).tolist()}
    with tarfile.open(path, "w:gz") as out:
        for name, content in members.items():
            if name != skip:
                data = pickle.dumps(content, protocol=2)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[str, Split]]:
    root = tmp_path / "cifar10"
    return root, build_image_folder(root)


@pytest.fixture
def python_splits() -> dict[str, Split]:
    rng = np.random.default_rng(1)
    train_labels = rng.permutation(np.repeat(np.arange(10, dtype=np.int64), TRAIN_PER_CLASS))
    return {
        "train": Split(random_images(rng, len(train_labels)), train_labels),
        "test": Split(random_images(rng, 10), np.arange(9, -1, -1, dtype=np.int64)),
    }


@pytest.fixture
def python_archive(tmp_path: Path, python_splits: dict[str, Split]) -> Path:
    train, test = python_splits["train"], python_splits["test"]
    return write_python_archive(
        tmp_path / "batches.tar.gz", planar(train.images), train.labels, planar(test.images), test.labels
    )


def in_source_order(dataset, name: str) -> Split:
    """A prepared split put back in the source's order: prepare stores image i of the source at the position where
    ``default_rng(shuffle_seed).permutation`` puts i (the manifest's documented order)."""
    stored = getattr(dataset, name)
    order = np.random.default_rng(dataset.manifest["shuffle_seed"]).permutation(len(stored.labels))
    images, labels = np.empty_like(stored.images), np.empty_like(stored.labels)
    images[order], labels[order] = stored.images, stored.labels
    return Split(images, labels)


def assert_splits_equal(dataset, expected: dict[str, Split]) -> None:
    """The dataset holds exactly the expected splits, source order undone."""
    for name in SPLITS:
        split = in_source_order(dataset, name)
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
        assert split.images.shape == expected[name].images.shape
        np.testing.assert_array_equal(split.images, expected[name].images)
        np.testing.assert_array_equal(split.labels, expected[name].labels)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------- both formats


def test_image_folder_directory_round_trips_exactly(image_folder, tmp_path):
    root, expected = image_folder
    dataset = prepare(root, tmp_path / "out")
    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train.images.shape == (30, 32, 32, 3) and dataset.test.images.shape == (20, 32, 32, 3)
    assert_splits_equal(dataset, expected)
    assert dataset.manifest["source_format"] == "image-folder"
    assert dataset.manifest["source_sha256"] is None
    reloaded = load_prepared(tmp_path / "out")
    assert_splits_equal(reloaded, expected)
    assert (reloaded.manifest, reloaded.manifest_sha256) == (dataset.manifest, dataset.manifest_sha256)


@pytest.mark.parametrize(("suffix", "top"), [(".tar.gz", "cifar10"), (".zip", "cifar10"), (".tar", None)])
def test_archives_give_the_same_arrays_as_the_directory(image_folder, tmp_path, suffix, top):
    root, expected = image_folder
    archive = archive_folder(root, tmp_path / f"packed{suffix}", top=top)
    dataset = prepare(archive, tmp_path / "out")
    assert dataset.manifest["source_format"] == "image-folder"
    assert_splits_equal(dataset, expected)


def test_python_format_round_trips_exactly(python_archive, python_splits, tmp_path):
    dataset = prepare(python_archive, tmp_path / "out")
    assert dataset.manifest["source_format"] == "cifar-python"
    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train.images.shape == (30, 32, 32, 3)
    assert_splits_equal(dataset, python_splits)


def test_python_labels_follow_the_requested_class_order(python_archive, python_splits, tmp_path):
    reversed_classes = CIFAR10_CLASSES[::-1]
    dataset = prepare(python_archive, tmp_path / "out", classes=reversed_classes)
    assert dataset.classes == reversed_classes
    train = in_source_order(dataset, "train")
    np.testing.assert_array_equal(train.labels, 9 - python_splits["train"].labels)
    np.testing.assert_array_equal(train.images, python_splits["train"].images)


def test_python_format_turns_planar_rows_into_hwc(tmp_path):
    rows = np.zeros((10, 3072), dtype=np.uint8)
    y, x = 5, 7
    rows[3, [y * 32 + x, 1024 + y * 32 + x, 2048 + y * 32 + x]] = (200, 100, 50)
    archive = write_python_archive(tmp_path / "b.tar.gz", rows, range(10), rows, range(10))
    test = in_source_order(prepare(archive, tmp_path / "out"), "test")
    assert test.images[3, y, x].tolist() == [200, 100, 50]
    assert test.images[3, x, y].tolist() == [0, 0, 0]
    assert int(test.images.sum()) == 350


def test_manifest_records_source_counts_and_checksums(image_folder, tmp_path):
    root, _ = image_folder
    archive = archive_folder(root, tmp_path / "packed.tar.gz", top="cifar10")
    out = tmp_path / "out"
    dataset = prepare(str(archive), out)
    raw = (out / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    assert dataset.manifest == manifest
    assert dataset.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert (manifest["format_version"], manifest["shuffle_seed"]) == (2, 0)
    assert manifest["source"] == str(archive)
    assert manifest["source_resolved"] == str(archive.resolve())
    assert manifest["source_sha256"] == sha256(archive)
    assert manifest["classes"] == list(CIFAR10_CLASSES)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        assert manifest["splits"][split] == {
            "count": per_class * 10,
            "per_class": dict.fromkeys(CIFAR10_CLASSES, per_class),
        }
    for name in ARRAY_NAMES:
        entry = manifest["arrays"][name]
        array = np.load(out / entry["file"])
        assert entry["file"] == f"{name}.npy"
        assert entry["sha256"] == sha256(out / entry["file"])
        assert (entry["shape"], entry["dtype"]) == (list(array.shape), str(array.dtype))
    assert sorted(path.name for path in out.iterdir()) == sorted([*(f"{n}.npy" for n in ARRAY_NAMES), "manifest.json"])


def test_grayscale_rgba_and_palette_images_become_rgb(tmp_path):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    folder = tmp_path / "src" / "train" / "things"
    folder.mkdir(parents=True)
    Image.fromarray(gray, mode="L").save(folder / "0_gray.png")
    Image.fromarray(rgba, mode="RGBA").save(folder / "1_rgba.png")
    paletted = Image.fromarray(indices, mode="P")
    paletted.putpalette(palette.tobytes())
    paletted.save(folder / "2_palette.png")
    write_png(tmp_path / "src" / "test" / "things" / "0.png", rgba[..., :3])
    images = in_source_order(prepare(tmp_path / "src", tmp_path / "out", classes=None), "train").images
    np.testing.assert_array_equal(images[0], np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(images[1], rgba[..., :3])
    np.testing.assert_array_equal(images[2], palette[indices])


def test_classes_none_takes_sorted_folder_names(tmp_path):
    built = build_image_folder(tmp_path / "src", classes=("zebra", "ant"))
    dataset = prepare(tmp_path / "src", tmp_path / "out", classes=None)
    assert dataset.classes == ("ant", "zebra")
    train = in_source_order(dataset, "train")
    np.testing.assert_array_equal(train.labels, [0] * TRAIN_PER_CLASS + [1] * TRAIN_PER_CLASS)
    ants = built["train"].images[built["train"].labels == 1]
    np.testing.assert_array_equal(train.images[train.labels == 0], ants)


def test_source_slug_names_the_prepared_folder(tmp_path):
    (tmp_path / "my-images").mkdir()
    assert source_slug(None) == source_slug(OFFICIAL_URL) == "cifar-10-python"
    assert source_slug("/data/cifar10-jpg.tar.gz") == "cifar10-jpg"
    assert [source_slug(f"s/x{ext}") for ext in (".tgz", ".tar", ".zip", ".TGZ")] == ["x"] * 4
    assert source_slug(tmp_path / "my-images") == "my-images"
    assert source_slug("https://example.org/mirror/cifar.tgz") == "cifar"


# --------------------------------------------------------------------------------- ensure_prepared


def test_ensure_prepared_reuses_a_prepared_copy_without_the_source(image_folder, tmp_path):
    root, expected = image_folder
    archive = archive_folder(root, tmp_path / "mine.zip")
    first = ensure_prepared(archive, tmp_path / "prepared")
    assert first.root == tmp_path / "prepared" / "mine"
    archive.unlink()
    second = ensure_prepared(archive, tmp_path / "prepared")
    assert second.manifest_sha256 == first.manifest_sha256
    assert_splits_equal(second, expected)


def test_ensure_prepared_reprepares_when_the_source_differs(image_folder, tmp_path):
    root, _ = image_folder
    first = ensure_prepared(archive_folder(root, tmp_path / "mine.zip"), tmp_path / "prepared")
    other_expected = build_image_folder(tmp_path / "other", seed=5)
    (tmp_path / "elsewhere").mkdir()
    other = archive_folder(tmp_path / "other", tmp_path / "elsewhere" / "mine.zip")
    second = ensure_prepared(other, tmp_path / "prepared")
    assert second.root == first.root
    assert second.manifest["source_resolved"] == str(other.resolve())
    assert_splits_equal(load_prepared(second.root), other_expected)


@pytest.fixture
def no_env_source(monkeypatch):
    monkeypatch.delenv("CIFAR10_SOURCE", raising=False)


def test_ensure_prepared_falls_back_to_the_env_var(image_folder, tmp_path, monkeypatch):
    root, expected = image_folder
    monkeypatch.setenv("CIFAR10_SOURCE", str(root))
    dataset = ensure_prepared(None, tmp_path / "prepared", url=UNREACHABLE_URL)
    assert dataset.root == tmp_path / "prepared" / "cifar10"
    assert dataset.manifest["source_resolved"] == str(root.resolve())
    assert_splits_equal(dataset, expected)


def test_offline_download_names_every_option(tmp_path, no_env_source):
    message = error_of(ensure_prepared, None, tmp_path / "prepared", url=UNREACHABLE_URL)
    assert UNREACHABLE_URL in message
    assert "data.source=" in message and "CIFAR10_SOURCE=" in message and "network" in message
    assert list((tmp_path / "prepared").iterdir()) == []


def test_download_is_md5_checked_before_it_is_kept(python_archive, python_splits, tmp_path, no_env_source):
    mirror = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    mirror.parent.mkdir()
    shutil.copy(python_archive, mirror)
    prepared = tmp_path / "prepared"
    message = error_of(ensure_prepared, None, prepared, url=mirror.as_uri())
    assert mirror.as_uri() in message and OFFICIAL_MD5 in message
    assert list(prepared.iterdir()) == []
    md5 = hashlib.md5(mirror.read_bytes()).hexdigest()
    dataset = ensure_prepared(None, prepared, url=mirror.as_uri(), expected_md5=md5)
    assert dataset.root == prepared / "cifar-10-python"
    assert dataset.manifest["source_resolved"] == mirror.as_uri()
    assert (prepared / "cifar-10-python.tar.gz").read_bytes() == mirror.read_bytes()
    assert_splits_equal(dataset, python_splits)


# ---------------------------------------------------------------------------------------- bad sources


def test_expected_md5_mismatch_names_file_and_digests(python_archive, tmp_path):
    message = error_of(prepare, python_archive, tmp_path / "out", expected_md5="0" * 32)
    actual = hashlib.md5(python_archive.read_bytes()).hexdigest()
    assert str(python_archive) in message and "0" * 32 in message and actual in message
    assert not (tmp_path / "out").exists()


def test_a_file_named_like_the_official_archive_is_checked_against_its_md5(python_archive, tmp_path):
    official = python_archive.rename(tmp_path / "cifar-10-python.tar.gz")
    message = error_of(prepare, official, tmp_path / "out")
    assert str(official) in message and OFFICIAL_MD5 in message


@pytest.mark.parametrize("packed", [False, True])
def test_corrupt_image_names_the_file(image_folder, tmp_path, packed):
    root, _ = image_folder
    (root / "train" / "cat" / "0009.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    source = archive_folder(root, tmp_path / "bad.tar.gz", top="cifar10") if packed else root
    message = error_of(prepare, source, tmp_path / "out")
    if packed:
        assert "cifar10/train/cat/0009.jpg" in message and str(source) in message
    else:
        assert str(root / "train" / "cat" / "0009.jpg") in message


def test_wrong_size_names_the_file_and_its_size(image_folder, tmp_path):
    root, _ = image_folder
    write_png(root / "test" / "dog" / "0005.png", np.zeros((32, 31, 3), dtype=np.uint8))
    message = error_of(prepare, root, tmp_path / "out")
    assert str(root / "test" / "dog" / "0005.png") in message and "31x32" in message


@pytest.mark.parametrize("classes", [CIFAR10_CLASSES, None])
def test_missing_test_class_names_class_and_split(image_folder, tmp_path, classes):
    root, _ = image_folder
    shutil.rmtree(root / "test" / "dog")
    message = error_of(prepare, root, tmp_path / "out", classes=classes)
    assert "missing class(es) dog " in message and str(root / "test") in message


def test_extra_class_is_refused(image_folder, tmp_path):
    root, _ = image_folder
    write_png(root / "train" / "unicorn" / "0000.png", np.zeros((32, 32, 3), dtype=np.uint8))
    message = error_of(prepare, root, tmp_path / "out")
    assert "unexpected class(es) unicorn" in message and str(root / "train") in message


@pytest.mark.parametrize("packed", [False, True])
def test_empty_class_folder_is_refused(image_folder, tmp_path, packed):
    root, _ = image_folder
    for image in (root / "train" / "frog").iterdir():
        image.unlink()
    source = archive_folder(root, tmp_path / "packed.tar.gz") if packed else root
    message = error_of(prepare, source, tmp_path / "out")
    assert "train/frog" in message and "empty class folder" in message


def test_python_archive_missing_a_batch_names_it(python_splits, tmp_path):
    train = python_splits["train"]
    rows = planar(train.images)
    archive = write_python_archive(tmp_path / "b.tgz", rows, train.labels, rows, train.labels, skip="test_batch")
    assert "lacks test_batch" in error_of(prepare, archive, tmp_path / "out")


def test_unrecognised_sources_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    assert "not a directory or a .tar" in error_of(prepare, tmp_path / "notes.txt", tmp_path / "out")
    assert "no CIFAR-10 data found" in error_of(prepare, tmp_path / "empty", tmp_path / "out")
    assert "no such file" in error_of(prepare, tmp_path / "absent.tar.gz", tmp_path / "out")


# --------------------------------------------------------------------------- prepared output integrity


def test_load_prepared_detects_a_tampered_array(image_folder, tmp_path):
    prepare(image_folder[0], tmp_path / "out")
    path = tmp_path / "out" / "train_images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    message = error_of(load_prepared, tmp_path / "out")
    assert str(path) in message and "sha256" in message and "prepare" in message


@pytest.mark.parametrize("name", ["manifest.json", "test_labels.npy"])
def test_load_prepared_detects_a_missing_file(image_folder, tmp_path, name):
    prepare(image_folder[0], tmp_path / "out")
    (tmp_path / "out" / name).unlink()
    message = error_of(load_prepared, tmp_path / "out")
    assert str(tmp_path / "out" / name) in message and "re-run" in message


def test_failing_prepare_keeps_the_previous_dataset_and_no_temp_dir(image_folder, tmp_path, monkeypatch):
    root, expected = image_folder
    good = prepare(root, tmp_path / "out")
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    (bad / "test" / "cat" / "0000.png").write_bytes(b"garbage")
    with pytest.raises(DataError):
        prepare(bad, tmp_path / "out", force=True)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        prepare(root, tmp_path / "out", force=True)
    monkeypatch.undo()
    assert load_prepared(tmp_path / "out").manifest_sha256 == good.manifest_sha256
    assert_splits_equal(load_prepared(tmp_path / "out"), expected)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_existing_dataset_is_replaced_only_with_force(image_folder, tmp_path):
    first = prepare(image_folder[0], tmp_path / "out")
    assert "--force" in error_of(prepare, image_folder[0], tmp_path / "out")
    second = prepare(image_folder[0], tmp_path / "out", force=True)
    assert second.manifest_sha256 == first.manifest_sha256  # same source, same bytes: prepare is deterministic


def test_a_folder_prepare_did_not_write_is_never_replaced(image_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "notes.txt" in error_of(prepare, image_folder[0], tmp_path / "out", force=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------- extra training images


def test_extra_train_images_join_the_train_split_only(image_folder, tmp_path):
    root, expected = image_folder
    extra = tmp_path / "feedback"
    pixels = random_images(np.random.default_rng(7), 3)
    write_png(extra / "cat" / "r1.png", pixels[0])
    write_png(extra / "airplane" / "r2.png", pixels[1])
    write_png(extra / "airplane" / "r3.png", pixels[2])
    write_png(extra / "cat" / ".r4.png.tmp", pixels[0])  # the feedback store's temp file: skipped
    (extra / "manifest.jsonl").write_text("{}\n")  # anything that is not <class>/<image>: skipped

    dataset = prepare(root, tmp_path / "out", extra_train=extra)
    train = in_source_order(dataset, "train")  # the source's images, then the extra ones, before the shuffle
    np.testing.assert_array_equal(train.images[:30], expected["train"].images)
    np.testing.assert_array_equal(train.images[30:], pixels[[1, 2, 0]])  # by class folder, then name
    assert train.labels[30:].tolist() == [0, 0, 3]
    np.testing.assert_array_equal(in_source_order(dataset, "test").images, expected["test"].images)
    recorded = dataset.manifest["extra_train"]
    assert (recorded["count"], recorded["path"]) == (3, str(extra))
    assert recorded["per_class"]["airplane"] == 2 and recorded["per_class"]["cat"] == 1
    assert dataset.manifest["splits"]["train"]["count"] == 33
    assert load_prepared(tmp_path / "out").manifest == dataset.manifest

    write_png(extra / "cat" / "r1.png", pixels[2])  # same names, other pixels: another identity
    again = prepare(root, tmp_path / "out", extra_train=extra, force=True)
    assert again.manifest["extra_train"]["sha256"] != recorded["sha256"]


def test_empty_extra_train_folder_adds_nothing(image_folder, tmp_path):
    root, expected = image_folder
    (tmp_path / "feedback").mkdir()
    dataset = prepare(root, tmp_path / "out", extra_train=tmp_path / "feedback")
    assert_splits_equal(dataset, expected)
    assert dataset.manifest["extra_train"]["count"] == 0


def test_extra_train_errors_are_clear_and_write_nothing(image_folder, tmp_path):
    root, _ = image_folder
    assert "no such directory" in error_of(prepare, root, tmp_path / "out", extra_train=tmp_path / "absent")
    write_png(tmp_path / "feedback" / "unicorn" / "r1.png", random_images(np.random.default_rng(0), 1)[0])
    message = error_of(prepare, root, tmp_path / "out", extra_train=tmp_path / "feedback")
    assert "'unicorn' is not a class of the source" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ scripts


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_prepare_cli_prints_one_error_line_and_exits_1(tmp_path):
    result = run_script("scripts/prepare_data.py", "--source", str(tmp_path / "absent.tgz"), "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "absent.tgz" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_prepare_cli_prepares(image_folder, tmp_path):
    result = run_script("scripts/prepare_data.py", "--source", str(image_folder[0]), "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert "30 train + 20 test" in result.stdout
    assert_splits_equal(load_prepared(tmp_path / "o"), image_folder[1])

    write_png(tmp_path / "feedback" / "dog" / "r1.png", random_images(np.random.default_rng(0), 1)[0])
    result = run_script(
        "scripts/prepare_data.py",
        "--source",
        str(image_folder[0]),
        "--out",
        str(tmp_path / "o"),
        "--force",
        "--extra-train",
        str(tmp_path / "feedback"),
    )
    assert result.returncode == 0, result.stderr
    assert f"31 train (of which 1 from {tmp_path / 'feedback'}) + 20 test" in result.stdout


def test_make_sample_is_reproducible_and_keeps_original_bytes(image_folder, tmp_path):
    root, expected = image_folder
    source = archive_folder(root, tmp_path / "full.tar.gz", top="cifar10")
    outs = [tmp_path / run / "tiny.tar.gz" for run in ("a", "b")]
    for out in outs:
        argv = ["--source", str(source), "--out", str(out), "--train-per-class", "2", "--test-per-class", "1"]
        assert sample.main(argv) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    with tarfile.open(outs[0]) as archive:
        members = archive.getmembers()
        original = archive.extractfile("tiny/train/cat/0001.png").read()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 0, 0)}
    assert original == (root / "train" / "cat" / "0001.png").read_bytes()
    dataset = prepare(outs[0], tmp_path / "out")
    first_two = np.isin(np.arange(30) % TRAIN_PER_CLASS, [0, 1])
    np.testing.assert_array_equal(in_source_order(dataset, "train").images, expected["train"].images[first_two])
    np.testing.assert_array_equal(in_source_order(dataset, "test").images, expected["test"].images[::TEST_PER_CLASS])


def test_committed_sample_has_400_and_100_images_per_class(tmp_path):
    dataset = prepare(REPO / "data" / "cifar10-sample.tar.gz", tmp_path / "out")
    assert dataset.classes == CIFAR10_CLASSES
    assert (len(dataset.train.labels), len(dataset.test.labels)) == (4000, 1000)
    assert dataset.manifest["splits"]["train"]["per_class"] == dict.fromkeys(CIFAR10_CLASSES, 400)
    assert dataset.manifest["splits"]["test"]["per_class"] == dict.fromkeys(CIFAR10_CLASSES, 100)


def test_any_leading_slice_of_the_committed_sample_holds_every_class(tmp_path):
    """What `debug=limit` evaluates (limit_test_batches of the stored order) is a fair sample, not one class."""
    dataset = prepare(REPO / "data" / "cifar10-sample.tar.gz", tmp_path / "out")
    for split in (dataset.train, dataset.test):
        for size in (100, 256):
            counts = np.bincount(split.labels[:size], minlength=10)
            assert counts.min() >= size // 10 // 3, counts  # every class, none starved
            assert counts.max() <= size // 10 * 2, counts


def test_a_copy_prepared_in_the_old_by_class_order_is_prepared_again(image_folder, tmp_path):
    root, expected = image_folder
    prepared = ensure_prepared(root, tmp_path / "prepared")
    manifest = json.loads((prepared.root / "manifest.json").read_text())
    (prepared.root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert "format_version 1, this version reads 2" in error_of(load_prepared, prepared.root)
    again = ensure_prepared(root, tmp_path / "prepared")
    assert again.manifest["format_version"] == 2
    assert_splits_equal(again, expected)

"""Cut a small, reproducible image-folder sample (first N images per class) out of a CIFAR-10 image folder.

The sample is committed so that tests and quick runs have real images without the full download: original
file bytes are kept (no re-encode) and the tar.gz is byte-identical on every run (sorted members, zeroed
times and owners), so regenerating it never shows up as a change.

    python scripts/make_sample.py --source cifar10-jpg.tar.gz --out data/cifar10-sample.tar.gz \\
        --train-per-class 400 --test-per-class 100
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
import tarfile
from pathlib import Path, PurePosixPath

from cifarlab.data.prepare import SPLITS, image_folder_key, iter_entries, source_slug
from cifarlab.errors import DataError
from cifarlab_contract.files import atomic_destination


def collect(source: Path, per_split: dict[str, int]) -> dict[str, bytes]:
    """Map ``<split>/<class>/<name>`` to the original bytes of the first N images (by name) of each class."""
    found: dict[tuple[str, str], dict[str, bytes]] = {}
    for member, read in iter_entries(source):
        key = image_folder_key(member, is_dir=read is None)
        if key is not None and read is not None:
            found.setdefault((key.split, key.class_name), {})[PurePosixPath(member).name] = read()
    chosen = {}
    for (split, class_name), images in sorted(found.items()):
        wanted = per_split[split]
        if len(images) < wanted:
            raise DataError(f"{source}: {split}/{class_name} has {len(images)} images, fewer than {wanted}")
        for name in sorted(images)[:wanted]:
            chosen[f"{split}/{class_name}/{name}"] = images[name]
    return chosen


def write_tar_gz(files: dict[str, bytes], out: Path, top: str) -> None:
    """Write ``files`` under ``top/`` as a deterministic tar.gz, atomically (temp file, then rename)."""
    folders = {str(parent) for name in files for parent in PurePosixPath(name).parents if str(parent) != "."}
    entries = sorted([(name, None) for name in folders | {""}] + list(files.items()))
    with (
        atomic_destination(out) as tmp,
        tmp.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.USTAR_FORMAT) as archive,
    ):
        for name, data in entries:
            info = tarfile.TarInfo(f"{top}/{name}".rstrip("/"))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                archive.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, type=Path, help="image-folder archive or directory")
    parser.add_argument("--out", required=True, type=Path, help="the sample .tar.gz to write")
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)
    per_split = dict(zip(SPLITS, (args.train_per_class, args.test_per_class), strict=True))
    try:
        files = collect(args.source, per_split)
        write_tar_gz(files, args.out, top=source_slug(args.out))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(files)} images to {args.out} ({args.out.stat().st_size} bytes)")
    return 0

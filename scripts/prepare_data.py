"""Prepare a CIFAR-10 source into verified .npy arrays + manifest.json (done once; training only loads).

    python scripts/prepare_data.py --source data/cifar10-sample.tar.gz --out data/prepared/cifar10-sample
    python scripts/prepare_data.py --source ... --out ... --extra-train data/feedback  # + labelled feedback

--source: the official cifar-10-python.tar.gz, an image-folder archive (.tar/.tar.gz/.tgz/.zip) or directory
with train/<class>/ and test/<class>/, or a URL to download.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import cifarlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifarlab.data.prepare import prepare
from cifarlab.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="archive, directory or URL")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the prepared dataset to")
    parser.add_argument("--force", action="store_true", help="replace an existing prepared dataset")
    parser.add_argument(
        "--extra-train", type=Path, help="folder of <class>/*.png|jpg images added to the training split only"
    )
    parser.add_argument("--md5", help="expected md5 of the source archive (checked before decoding)")
    args = parser.parse_args(argv)
    try:
        dataset = prepare(args.source, args.out, expected_md5=args.md5, force=args.force, extra_train=args.extra_train)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    extra = dataset.manifest.get("extra_train")
    added = f" (of which {extra['count']} from {extra['path']})" if extra else ""
    print(
        f"prepared {len(dataset.train.labels)} train{added} + {len(dataset.test.labels)} test images, "
        f"{len(dataset.classes)} classes, in {dataset.root} (manifest sha256 {dataset.manifest_sha256})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

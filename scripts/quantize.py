"""Quantise an exported model to static INT8, and keep it only if it holds its test accuracy.

    python scripts/quantize.py --model runs/<run id>/model.onnx             # make quantize ARGS="--model ..."
    CIFAR10_SOURCE=/path/to/cifar10 python scripts/quantize.py --model runs/<run id>/model.onnx --max-loss 0.5

Calibrates on the first --calibration training images of the data (default: $CIFAR10_SOURCE, else the committed
sample), then scores the fp32 and the int8 model on the whole test split. Within --max-loss points of the fp32
accuracy, it writes <model>.int8.onnx beside the model (cifarlab.export.quantize). Otherwise it writes nothing
and exits 1. Serve it like any export: MODEL_URI=runs/<run id>/model.int8.onnx make serve.
"""

import argparse
import os
from pathlib import Path

from cifarlab.data.prepare import SOURCE_ENV_VAR, ensure_prepared
from cifarlab.export.onnx import read_metadata
from cifarlab.export.quantize import MAX_ACCURACY_LOSS, onnx_accuracy, quantize_int8
from cifarlab.runtime import user_errors_exit
from cifarlab_contract.errors import UserError
from cifarlab_contract.files import atomic_destination

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10-sample.tar.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported model.onnx")
    parser.add_argument("--data", default=os.environ.get(SOURCE_ENV_VAR) or str(SAMPLE), help="CIFAR-10 source")
    parser.add_argument("--prepared-root", type=Path, default=ROOT / "data" / "prepared", help="prepared copies")
    parser.add_argument("--calibration", type=int, default=1000, help="training images to calibrate on")
    parser.add_argument(
        "--max-loss", type=float, default=MAX_ACCURACY_LOSS, help="test accuracy points int8 may lose (%(default)s)"
    )
    parser.add_argument("--out", type=Path, help="default: <model>.int8.onnx beside the model")
    args = parser.parse_args(argv)
    if args.calibration < 1:
        parser.error("--calibration must be at least 1")
    return args


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.model.is_file():
        raise UserError(f"no model at {args.model}: export one first (python train.py)")
    try:
        contract = read_metadata(args.model)
    except Exception as error:  # protobuf and onnx raise their own types for a file that is not a model
        raise UserError(f"{args.model} is not an ONNX model: {error}") from error
    if "classes" not in contract:
        raise UserError(f"{args.model} is not an export under the model contract (no classes in its metadata)")
    out = args.out or args.model.with_suffix(".int8.onnx")
    dataset = ensure_prepared(args.data, args.prepared_root)
    test = dataset.test
    with atomic_destination(out) as candidate:  # moved to `out` only if the block ends without an error
        quantize_int8(args.model, candidate, dataset.train.images[: args.calibration])
        fp32, int8 = (onnx_accuracy(path, test.images, test.labels) for path in (args.model, candidate))
        loss = 100 * (fp32 - int8)
        print(f"test accuracy on {len(test.labels)} images: fp32 {100 * fp32:.2f}%, int8 {100 * int8:.2f}%")
        if loss > args.max_loss:
            raise UserError(
                f"the int8 model loses {loss:.2f} points of test accuracy (--max-loss {args.max_loss}): not written"
            )
    print(f"wrote {out} ({loss:+.2f} points against fp32)")


if __name__ == "__main__":
    main()

"""Smoke-test a running inference server: wait for /readyz, classify one real test image, print one line.

Standard library only, so it runs from any Python (CI host, container, fresh venv):
    python scripts/smoke_serve.py --url http://127.0.0.1:8000
Exit status 1 with one line on stderr if the server is not ready in time or answers wrongly.
"""

import argparse
import json
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "cifar10-sample.tar.gz"


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"error: {url}/readyz not ready after {timeout:.0f} s ({error})") from None
        time.sleep(0.5)


def first_test_image(sample: Path) -> tuple[str, str, bytes]:
    """(true label, file name, JPEG bytes) of the sample's first test image."""
    with tarfile.open(sample) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and "test" in parts and member.name.endswith((".jpg", ".jpeg", ".png")):
                handle = archive.extractfile(member)
                assert handle is not None
                return parts[-2], parts[-1], handle.read()
    raise SystemExit(f"error: no test image in {sample}")


def predict(url: str, name: str, data: bytes, api_key: str | None) -> dict:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if api_key:
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(f"{url}/v1/predict", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        raise SystemExit(f"error: /v1/predict answered {error.code}: {error.read().decode()[:300]}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for /readyz")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    args = parser.parse_args()
    url = args.url.rstrip("/")
    wait_ready(url, args.timeout)
    truth, name, data = first_test_image(args.sample)
    answer = predict(url, name, data, args.api_key)
    (prediction,) = answer["predictions"]
    if not 0.0 <= prediction["confidence"] <= 1.0 or not answer["request_id"]:
        print(f"error: implausible answer {answer}", file=sys.stderr)
        raise SystemExit(1)
    print(
        f"ok: {url} model {answer['model']['version']} (run {answer['model']['run_id']}): {name} (a {truth}) -> "
        f"{prediction['label']} ({prediction['confidence']:.3f})"
    )


if __name__ == "__main__":
    main()

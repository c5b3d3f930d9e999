#!/usr/bin/env bash
# The smoke pipeline (make smoke; the smoke job of ci.yml): train a tiny model on the committed sample, which
# exports it to ONNX, serve that export with the real service, and classify one image over HTTP.
# Everything goes to a temporary folder that is removed at the end. SMOKE_PORT picks the port (default 8765).
set -euo pipefail
cd "$(dirname "$0")/.."

port=${SMOKE_PORT:-8765}
url=http://127.0.0.1:$port
work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== train (tiny, CPU) and export"
python train.py trainer.accelerator=cpu debug=limit logger=none seed=0 \
    "paths.runs_dir=$work/runs" "paths.log_dir=$work/logs" >"$work/train.log" 2>&1 || {
    tail -n 30 "$work/train.log" >&2
    echo "error: training failed (log above)" >&2
    exit 1
}
models=("$work"/runs/*/model.onnx)
[ -f "${models[0]}" ] || { echo "error: training exported no model.onnx under $work/runs" >&2; exit 1; }
model=${models[0]}
echo "exported $model"

echo "== one test image of the committed sample, as PNG"
python - "$work/image.png" <<'PY'
import sys
import tarfile

from PIL import Image

with tarfile.open("data/cifar10-sample.tar.gz") as archive:
    member = next(m for m in archive.getmembers() if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png")))
    Image.open(archive.extractfile(member)).convert("RGB").save(sys.argv[1])
    print(f"{member.name} -> {sys.argv[1]}")
PY

echo "== serve on $url"
MODEL_URI=$model uvicorn --factory serve.app:create_app --host 127.0.0.1 --port "$port" >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 60); do
    if curl -fsS "$url/readyz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        cat "$work/serve.log" >&2
        echo "error: the service exited before it was ready (log above)" >&2
        exit 1
    fi
    sleep 0.5
done
curl -fsS "$url/readyz" || { cat "$work/serve.log" >&2; echo "error: /readyz never answered 200 in 30 s" >&2; exit 1; }
echo

echo "== predict"
response=$(curl -fsS -X POST -F "files=@$work/image.png;type=image/png" "$url/v1/predict")
echo "$response"
if ! grep -Eq '"(airplane|automobile|bird|cat|deer|dog|frog|horse|ship|truck)"' <<<"$response"; then
    echo "error: the prediction names no CIFAR-10 class" >&2
    exit 1
fi
echo "smoke: ok"

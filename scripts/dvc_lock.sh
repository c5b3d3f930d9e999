#!/usr/bin/env bash
# make dvc-lock: regenerate the committed dvc.lock (and the small reports/ it records) by a real `dvc repro` of
# dvc.yaml on the committed sample. It runs in a throwaway copy of the repository (the files git tracks or would
# track, uncommitted edits included), with the sample as the pipeline's raw source, so a real
# data/raw/cifar10.tar.gz, models/ and runs/ here are never touched. The copy shares this clone's DVC cache: the
# outputs dvc.lock names stay in .dvc/cache, for `dvc checkout` and `make dvc-push`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
sample=data/cifar10-sample.tar.gz
[ -f "$sample" ] || { echo "error: $sample is missing: it is committed, restore it with git checkout" >&2; exit 1; }
command -v dvc >/dev/null || { echo "error: dvc is not installed: run make venv (the pipeline extra)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
copy=$work/repo
mkdir "$copy"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
    if [ -f "$file" ]; then cp --parents -p "$file" "$copy/"; fi  # a tracked file deleted here stays out
done
git -C "$copy" init -q
# the sample as the raw source, exactly how tests/servers.py sets up its pipeline; no feedback yet
cp "$sample" "$copy/data/raw/cifar10.tar.gz"
mkdir -p "$copy/data/feedback"
rm -f "$copy/dvc.lock"  # a full repro, not one that trusts the previous lock
(cd "$copy" && dvc cache dir --local "$root/.dvc/cache")

echo "dvc repro in $copy (log: $work/repro.log; kept only if it fails)"
# the copy's own code and outputs: no PROJECT_ROOT, data source or tracking server inherited from this shell
if ! (cd "$copy" && env -u CIFAR10_SOURCE -u MLFLOW_TRACKING_URI PROJECT_ROOT="$copy" PYTHONPATH="$copy/src:$copy" \
    DVC_NO_ANALYTICS=1 DVC_SITE_CACHE_DIR="$work/dvc-site-cache" dvc repro >"$work/repro.log" 2>&1); then
    tail -n 30 "$work/repro.log" >&2
    kept=$(mktemp -d)
    cp "$work/repro.log" "$kept/"
    echo "error: dvc repro failed (last lines above; full log: $kept/repro.log)" >&2
    exit 1
fi

# each file replaced whole (written beside it, then renamed), so an interrupted copy leaves the old one
mkdir -p reports
for file in dvc.lock "$copy"/reports/*; do
    name=${file#"$copy"/}
    cp "$copy/$name" "$name.tmp" && mv "$name.tmp" "$name"
done
echo "wrote dvc.lock and reports/; commit them: git add dvc.lock reports"

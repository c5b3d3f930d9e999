"""Compare a challenger variant with the champion on the service's feedback, and recommend what to do.

    python scripts/ab_report.py --feedback $FEEDBACK_DIR [--metrics-url http://127.0.0.1:8000/metrics]
        [--json report.json] [--promote]

Reads the feedback store the servers write (cifarlab_contract.feedback: a folder or a gs:// URL): per variant,
the feedback count, accuracy with a 95% Wilson interval and model versions. If the challenger ran in shadow (it
appears in the records' `shadows`), both variants predicted the same images and the comparison is paired
(McNemar's exact test); otherwise the variants answered different requests and it is independent (two-proportion
z-test). Both come with a seeded bootstrap interval of the accuracy difference (cifarlab_lifecycle.abtest). The
recommendation is to promote the challenger, keep the champion, or keep collecting feedback. With `--promote`, a
"promote" moves the registry's champion alias to the tested challenger version
(cifarlab_lifecycle.promotion.promote_version), with the registered model, tracking URI and aliases of
configs/promote.yaml.

scripts/ab_report.py is its command line; errors the user can fix are UserError (one line there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cifarlab_contract.errors import UserError
from cifarlab_contract.feedback import MANIFEST_FILE, FeedbackRecord, open_feedback_store
from cifarlab_contract.files import write_atomic
from cifarlab_lifecycle import abtest

PREDICTIONS_SAMPLE = "cifarlab_predictions_total"  # served predictions, labelled by variant and predicted label


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--feedback",
        default=os.environ.get("FEEDBACK_DIR"),
        help="the servers' feedback store: a folder or an fsspec URL (gs://...); default: $FEEDBACK_DIR",
    )
    parser.add_argument("--champion", default="champion", help="the variant to beat (default: %(default)s)")
    parser.add_argument("--challenger", default="challenger", help="the variant tried (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=abtest.ALPHA, help="significance level (default %(default)s)")
    parser.add_argument("--power", type=float, default=abtest.POWER, help="for 'how much more feedback'")
    parser.add_argument(
        "--min-samples",
        type=int,
        default=abtest.MIN_SAMPLES,
        help="feedback per variant below which the answer is 'keep collecting' (default %(default)s)",
    )
    parser.add_argument("--resamples", type=int, default=abtest.RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--metrics-url", help="the server's /metrics: served predictions per variant")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this path")
    parser.add_argument("--promote", action="store_true", help="move the champion alias if the answer is promote")
    parser.add_argument("--model-name", help="registered model (default: configs/promote.yaml's)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: configs/promote.yaml's)")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1 or not 0 < args.power < 1:
        parser.error("--alpha and --power must lie between 0 and 1")
    if args.min_samples < 1 or args.resamples < 1:
        parser.error("--min-samples and --resamples must be at least 1")
    return args


@dataclass
class VariantFeedback:
    """What the feedback says about one variant in one role (answering requests, or shadowing them)."""

    name: str
    role: str  # "answer" or "shadow"
    outcomes: list[bool] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)

    def add(self, correct: bool, version: str) -> None:
        self.outcomes.append(bool(correct))
        self.versions.add(str(version))


def load_records(url: str | None) -> tuple[str, list[FeedbackRecord], int]:
    """The store's URL, its records, and how many bytes of a torn manifest tail (an older store's) were left out."""
    if url is None:
        raise UserError("no feedback to read: pass --feedback DIR (the servers' feedback store) or set FEEDBACK_DIR")
    if Path(url).name == MANIFEST_FILE and Path(url).is_file():  # an older store, named by its manifest
        url = str(Path(url).parent)
    contents = open_feedback_store(url).contents()
    if not contents.records:
        raise UserError(f"{url} holds no complete feedback records (the servers write them with the first feedback)")
    return url, contents.records, contents.torn_bytes


def by_variant(records: list[FeedbackRecord]) -> dict[tuple[str, str], VariantFeedback]:
    """Feedback per (variant, role): answering variants from `variant`, shadow variants from `shadows`."""
    variants: dict[tuple[str, str], VariantFeedback] = {}
    for record in records:
        for position, (name, version, predicted) in enumerate(record.outcomes()):
            role = "answer" if position == 0 else "shadow"  # outcomes() yields the answering variant first
            variants.setdefault((name, role), VariantFeedback(name, role)).add(predicted == record.label, version)
    return variants


def compared_outcomes(
    records: list[FeedbackRecord], champion: str, challenger: str
) -> tuple[abtest.Design, VariantFeedback, VariantFeedback]:
    """The two variants' outcomes to compare: paired on the images where one shadowed the other, else the
    requests each answered."""
    paired = {name: VariantFeedback(name, "paired") for name in (champion, challenger)}
    for record in records:
        other = {champion: challenger, challenger: champion}.get(record.variant)
        if other is not None and other in record.shadows:
            paired[record.variant].add(record.correct, record.version)
            shadow = record.shadows[other]
            paired[other].add(bool(shadow["correct"]), str(shadow["version"]))
    if paired[champion].outcomes:
        return "paired", paired[champion], paired[challenger]
    answering = {key[0]: value for key, value in by_variant(records).items() if key[1] == "answer"}
    for name in (champion, challenger):
        if name not in answering:
            raise UserError(
                f"variant {name!r} answered no request with feedback and never shadowed the other one "
                f"(answering variants: {', '.join(sorted(answering))}); choose --champion/--challenger"
            )
    return "independent", answering[champion], answering[challenger]


def served_predictions(url: str) -> dict[str, float]:
    """Predictions served per variant, from the server's Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise UserError(f"cannot read metrics from {url}: {getattr(error, 'reason', error)}") from error
    served: dict[str, float] = defaultdict(float)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == PREDICTIONS_SAMPLE:
                    served[sample.labels.get("variant", "")] += sample.value
    except ValueError as error:
        raise UserError(f"{url} is not a Prometheus exposition: {error}") from error
    return dict(served)


def variant_table(variants: dict[tuple[str, str], VariantFeedback], served: dict[str, float] | None) -> list[dict]:
    """One row per variant and role: feedback, accuracy and interval, versions; traffic share and feedback
    coverage when the server's metrics were read."""
    rows = []
    answering_total = sum(v for name, v in (served or {}).items() if (name, "shadow") not in variants)
    names = sorted(set(variants) | {(name, "answer") for name in served or {} if (name, "shadow") not in variants})
    for name, role in names:
        feedback = variants.get((name, role), VariantFeedback(name, role))
        row: dict = {"variant": name, "role": role, "versions": sorted(feedback.versions), "feedback": 0}
        if feedback.outcomes:
            row.update(_accuracy_fields(abtest.accuracy(np.array(feedback.outcomes))))
        if served is not None:
            predictions = served.get(name, 0.0)
            row["predictions"] = int(predictions)
            row["traffic_share"] = predictions / answering_total if role == "answer" and answering_total else None
            row["coverage"] = len(feedback.outcomes) / predictions if predictions else None
        rows.append(row)
    return rows


def _accuracy_fields(accuracy: abtest.Accuracy) -> dict:
    interval = [accuracy.low, accuracy.high]
    return {
        "feedback": accuracy.count,
        "correct": accuracy.correct,
        "accuracy": accuracy.accuracy,
        "interval": interval,
    }


def build_report(args: argparse.Namespace) -> tuple[dict, str | None]:
    """The report as JSON-ready data, and the tested challenger's version if it is a single one."""
    if args.champion == args.challenger:
        raise UserError(f"--champion and --challenger are both {args.champion!r}: name two different variants")
    store, records, torn = load_records(args.feedback)
    variants = by_variant(records)
    known = sorted({name for name, _ in variants})
    for name in (args.champion, args.challenger):
        if name not in known:
            raise UserError(f"variant {name!r} has no feedback in {store} (variants there: {', '.join(known)})")
    served = served_predictions(args.metrics_url) if args.metrics_url else None
    design, champion, challenger = compared_outcomes(records, args.champion, args.challenger)
    comparison = abtest.compare(
        np.array(champion.outcomes),
        np.array(challenger.outcomes),
        design,
        alpha=args.alpha,
        power=args.power,
        resamples=args.resamples,
        seed=args.seed,
    )
    recommendation = abtest.recommend(comparison, alpha=args.alpha, min_samples=args.min_samples)
    report = {
        "store": store,
        "records": len(records),
        "torn_bytes_ignored": torn,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "champion": args.champion,
        "challenger": args.challenger,
        "variants": variant_table(variants, served),
        "comparison": {
            **asdict(comparison),
            "champion_versions": sorted(champion.versions),
            "challenger_versions": sorted(challenger.versions),
            "samples": comparison.samples,
            "required": None if math.isinf(comparison.required) else comparison.required,
        },
        "recommendation": asdict(recommendation),
        "promotion": None,
    }
    tested = next(iter(challenger.versions)) if len(challenger.versions) == 1 else None
    return report, tested


def promote(args: argparse.Namespace, report: dict, tested_version: str | None) -> dict:
    """Move the champion alias to the tested challenger version if the recommendation is to promote."""
    from cifarlab_lifecycle.promotion import promote_version  # MLflow and Hydra load only to promote
    from cifarlab_lifecycle.registry import registry_config

    recommendation = report["recommendation"]
    if recommendation["action"] != "promote":
        return {"promoted": False, "reason": f"the recommendation is {recommendation['action']!r}, not 'promote'"}
    comparison = report["comparison"]
    if tested_version is None:
        versions = ", ".join(comparison["challenger_versions"])
        raise UserError(f"the challenger's feedback spans versions {versions}: promote one tested version at a time")
    given = {"model_name": args.model_name, "tracking_uri": args.tracking_uri}
    registry = registry_config([f"{key}={value}" for key, value in given.items() if value])
    name = registry.model_name
    if not name:
        raise UserError("no registered model name: pass --model-name")
    evidence = {
        "method": f"ab_test ({comparison['design']}, {comparison['test']})",
        "p_value": f"{comparison['p_value']:.6g}",
        "difference": f"{comparison['difference']:.6f}",
        "interval": "{:.6f} {:.6f}".format(*comparison["interval"]),
        "samples": str(comparison["samples"]),
        "alpha": str(args.alpha),
        "challenger_score": f"{comparison['challenger']['accuracy']:.6f}",
        "champion_score": f"{comparison['champion']['accuracy']:.6f}",
    }
    previous = promote_version(
        registry.tracking_uri,
        name,
        tested_version,
        evidence,
        registry.champion_alias,
        registry.challenger_alias,
        why=f"A/B test: {recommendation['reason']}",
        via="scripts/ab_report.py --promote",
    )
    return {
        "promoted": True,
        "model": name,
        "version": tested_version,
        "alias": registry.champion_alias,
        "previous_champion": previous,
    }


def format_report(report: dict) -> str:
    header = ["variant", "role", "versions", "feedback", "accuracy", "95% interval"]
    rows = [
        [
            row["variant"],
            row["role"],
            ",".join(row["versions"]) or "-",
            str(row["feedback"]),
            _percent(row.get("accuracy")),
            "{} - {}".format(*map(_percent, row["interval"])) if "interval" in row else "",
        ]
        for row in report["variants"]
    ]
    if any("predictions" in row for row in report["variants"]):  # the server's metrics were read
        header += ["predictions", "share", "coverage"]
        for cells, row in zip(rows, report["variants"], strict=True):
            cells += [str(row["predictions"]), _percent(row["traffic_share"]), _percent(row["coverage"])]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    table = [header, ["-" * width for width in widths], *rows]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    c, r = report["comparison"], report["recommendation"]
    counts = (c["champion"]["count"], c["challenger"]["count"])
    samples = f"{counts[0]} images both predicted" if c["design"] == "paired" else "{} + {} requests".format(*counts)
    lines += [
        "",
        f"{report['challenger']} vs {report['champion']}: {c['design']} comparison ({c['test']}), {samples}",
        f"recommendation: {r['action'].upper()} (confidence {r['confidence']:.1%}: share of bootstrap resamples "
        f"in that direction)",
        f"  {r['reason']}",
    ]
    if report["torn_bytes_ignored"]:
        lines.append(
            f"note: an incomplete last line ({report['torn_bytes_ignored']} bytes) of the manifest was ignored"
        )
    return "\n".join(lines)


def describe_promotion(promotion: dict) -> str:
    if not promotion["promoted"]:
        return f"--promote: nothing promoted: {promotion['reason']}"
    previous = promotion["previous_champion"] or "none"
    return (
        f"--promote: {promotion['model']} version {promotion['version']} is now {promotion['alias']} "
        f"(was version {previous})"
    )


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report, tested_version = build_report(args)
    print(format_report(report), flush=True)
    if args.promote:
        report["promotion"] = promote(args, report, tested_version)
        print(describe_promotion(report["promotion"]))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return 0

"""Writes the Grafana dashboards in monitoring/grafana/dashboards/ from the panel lists below.

    python monitoring/grafana/build_dashboards.py

Dashboards as code: edit the panels here, re-run, commit both. tests/monitoring checks the JSON is up to date,
well formed, and that every query parses and uses only the service's metric names.
"""

import json
from pathlib import Path

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "cifarlab-prometheus"}  # provisioning/datasources/prometheus.yml
RATE = "$__rate_interval"
VARIANT = 'variant=~"$variant"'

# (title, unit, [(expr, legend)], width); panels flow left to right, 24 columns per row.
Panel = tuple[str, str, list[tuple[str, str]], int]


def quantiles(histogram: str, levels: tuple[float, ...], selector: str, by: str = "") -> list[tuple[str, str]]:
    """histogram_quantile queries of a histogram, one per level, optionally per label `by`."""
    group = f"{by}, le" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{{{selector}}}[{RATE}])))",
            f"{legend}p{round(q * 100)}",
        )
        for q in levels
    ]


SERVICE: list[Panel] = [
    (
        "Requests per second by route",
        "reqps",
        [(f"sum by (route) (rate(cifarlab_http_requests_total[{RATE}]))", "{{route}}")],
        12,
    ),
    (
        "Errors per second by status",
        "reqps",
        [(f'sum by (status) (rate(cifarlab_http_requests_total{{status=~"4..|5.."}}[{RATE}]))', "{{status}}")],
        12,
    ),
    (
        "Request latency p50 / p99",
        "s",
        quantiles("cifarlab_http_request_duration_seconds", (0.5, 0.99), 'route!="/metrics"'),
        12,
    ),
    (
        "Server error ratio",
        "percentunit",
        [
            (
                # `or vector(0)`: no 5xx series at all is a ratio of 0, not "no data"
                f'(sum(rate(cifarlab_http_requests_total{{status=~"5.."}}[{RATE}])) or vector(0)) '
                f"/ sum(rate(cifarlab_http_requests_total[{RATE}]))",
                "5xx / all",
            )
        ],
        12,
    ),
    ("Requests in flight", "short", [("cifarlab_http_requests_in_flight", "in flight")], 8),
    ("CPU (cores)", "short", [(f'rate(process_cpu_seconds_total{{job="cifarlab"}}[{RATE}])', "{{instance}}")], 8),
    ("Resident memory", "bytes", [('process_resident_memory_bytes{job="cifarlab"}', "{{instance}}")], 8),
    (
        "Model ready",
        "short",
        [(f"cifarlab_model_ready{{{VARIANT}}}", "{{variant}}")],
        12,
    ),
    (
        "Model reloads per hour",
        "short",
        [
            (
                f"sum by (variant, result) (increase(cifarlab_model_reloads_total{{{VARIANT}}}[1h]))",
                "{{variant}} {{result}}",
            )
        ],
        12,
    ),
]

MODEL: list[Panel] = [
    (
        "Model versions",
        "short",
        [(f"cifarlab_model_info{{{VARIANT}}}", "{{variant}} v{{version}} {{run_id}}")],
        24,
    ),
    (
        "Predictions per second by variant",
        "reqps",
        [(f"sum by (variant) (rate(cifarlab_predictions_total{{{VARIANT}}}[{RATE}]))", "{{variant}}")],
        12,
    ),
    (
        "Predicted class mix",
        "percentunit",
        [
            (
                f"sum by (label) (rate(cifarlab_predictions_total{{{VARIANT}}}[{RATE}])) "
                f"/ scalar(sum(rate(cifarlab_predictions_total{{{VARIANT}}}[{RATE}])))",
                "{{label}}",
            )
        ],
        12,
    ),
    (
        "Batch size p50 / p99",
        "short",
        quantiles("cifarlab_batch_size", (0.5, 0.99), VARIANT, by="variant"),
        12,
    ),
    (
        "Predict request latency p50 / p99 by variant",
        "s",
        quantiles(
            "cifarlab_http_request_duration_seconds", (0.5, 0.99), f'route="/v1/predict", {VARIANT}', by="variant"
        ),
        12,
    ),
    (
        "Inference latency p50 / p99",
        "s",
        quantiles("cifarlab_inference_duration_seconds", (0.5, 0.99), VARIANT, by="variant"),
        12,
    ),
    (
        "Mean confidence",
        "percentunit",
        [
            (
                f"sum by (variant) (rate(cifarlab_prediction_confidence_sum{{{VARIANT}}}[{RATE}])) "
                f"/ sum by (variant) (rate(cifarlab_prediction_confidence_count{{{VARIANT}}}[{RATE}]))",
                "{{variant}}",
            )
        ],
        12,
    ),
    (
        "Confidence p10 / p50",
        "percentunit",
        quantiles("cifarlab_prediction_confidence", (0.1, 0.5), VARIANT, by="variant"),
        12,
    ),
    ("Drift score by test", "short", [(f"cifarlab_drift_score{{{VARIANT}}}", "{{variant}} {{test}}")], 12),
    ("Drift detected", "short", [(f"cifarlab_drift_detected{{{VARIANT}}}", "{{variant}}")], 12),
    (
        "Live accuracy (from feedback)",
        "percentunit",
        [(f"cifarlab_live_accuracy{{{VARIANT}}}", "{{variant}} v{{version}}")],
        12,
    ),
    (
        "Feedback per hour",
        "short",
        [
            (
                f"sum by (variant, correct) (increase(cifarlab_feedback_total{{{VARIANT}}}[1h]))",
                "{{variant}} correct={{correct}}",
            )
        ],
        12,
    ),
    (
        "Live precision by class",
        "percentunit",
        [(f"cifarlab_live_precision{{{VARIANT}}}", "{{variant}} v{{version}} {{label}}")],
        12,
    ),
    (
        "Live recall by class",
        "percentunit",
        [(f"cifarlab_live_recall{{{VARIANT}}}", "{{variant}} v{{version}} {{label}}")],
        12,
    ),
    (
        "Shadow copies dropped per hour (the shadow fell behind)",
        "short",
        [(f"sum by (variant) (increase(cifarlab_shadow_dropped_total{{{VARIANT}}}[1h]))", "{{variant}}")],
        12,
    ),
]


def panel(number: int, title: str, unit: str, queries: list[tuple[str, str]], x: int, y: int, width: int) -> dict:
    return {
        "id": number,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard(uid: str, title: str, panels: list[Panel]) -> dict:
    laid_out, x, y = [], 0, 0
    for number, (name, unit, queries, width) in enumerate(panels, start=1):
        if x + width > 24:
            x, y = 0, y + 8
        laid_out.append(panel(number, name, unit, queries, x, y, width))
        x += width
    variant_query = "label_values(cifarlab_model_ready, variant)"
    return {
        "uid": uid,
        "title": title,
        "tags": ["cifarlab"],
        "timezone": "utc",
        "editable": False,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "variant",
                    "label": "variant",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": variant_query,
                    "query": {"query": variant_query, "refId": "variant"},
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                }
            ]
        },
        "panels": laid_out,
    }


def build() -> dict[str, dict]:
    """File name -> dashboard."""
    return {
        "cifarlab-service.json": dashboard("cifarlab-service", "cifarlab: service health", SERVICE),
        "cifarlab-model.json": dashboard("cifarlab-model", "cifarlab: model quality, drift and A/B", MODEL),
    }


def render(board: dict) -> str:
    return json.dumps(board, indent=2) + "\n"


def main() -> None:
    DASHBOARDS.mkdir(exist_ok=True)
    for name, board in build().items():
        (DASHBOARDS / name).write_text(render(board))
        print(f"wrote {DASHBOARDS / name}")


if __name__ == "__main__":
    main()

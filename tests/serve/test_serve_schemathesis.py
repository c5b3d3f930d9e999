"""Schemathesis against the running server's own OpenAPI schema: every generated request, valid or not, gets a
documented status, content type and body (never a 500), and the API key is really enforced. Its stateful phase
follows the schema's links, predict -> feedback among them, with ids the server really issued."""

import base64
import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import API_KEY, Server, deployed

pytestmark = pytest.mark.slow  # fuzzes the served API for its schema's every operation

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "ignored_auth",
]
MAX_EXAMPLES = 200
FEEDBACK_LINK = "POST /v1/predict -> [200] ConfirmFirstPrediction -> POST /v1/feedback"  # serve/app.py, PREDICT_LINKS
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def feedback_server(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The deployed server's limits (tests/serve/conftest.py, `server`), with feedback on: the links lead there."""
    folder = tmp_path_factory.mktemp("schemathesis-server")
    env = {**deployed(onnx_model), "FEEDBACK_DIR": str(folder / "feedback")}
    running = Server(env, folder / "server.log").start()
    yield running
    running.stop()


def recorded_cases(events: Path) -> Iterator[tuple[str, dict, dict]]:
    """(phase, case, request and response as sent and answered) of each test case in schemathesis's NDJSON report."""
    with events.open() as lines:
        for line in lines:
            finished = json.loads(line).get("ScenarioFinished")
            if finished is None:
                continue
            recorder = finished["recorder"]
            for case_id, case in recorder.get("cases", {}).items():
                yield finished["phase"], case, recorder["interactions"].get(case_id) or {}


def sent_json(interaction: dict) -> object:
    body = interaction.get("request", {}).get("body") or {}
    try:
        return json.loads(base64.b64decode(body.get("$base64", "")))
    except ValueError:
        return None


def operations_with_inputs(document: dict) -> set[tuple[str, str]]:
    """(method, path) of each operation that takes parameters or a body: those generate more than one request."""
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS and (operation.get("parameters") or operation.get("requestBody"))
    }


def test_schemathesis_finds_no_failures(feedback_server, tmp_path):
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis not found: pip install -e '.[dev]'"
    events = tmp_path / "events.ndjson"
    result = subprocess.run(
        [
            *(schemathesis, "run", f"{feedback_server.url}/openapi.json", "--checks", ",".join(CHECKS)),
            *("--header", f"X-API-Key: {API_KEY}", "--max-examples", str(MAX_EXAMPLES), "--seed", "1"),
            *("--workers", "1", "--phases", "coverage,fuzzing,stateful", "--no-color"),
            *("--generation-database", "none", "--request-timeout", "20"),
            *("--report", "ndjson", "--report-ndjson-path", str(events)),
        ],
        cwd=tmp_path,  # its cache folder stays out of the repository
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Tested: 17" in result.stdout, result.stdout[-3000:]  # every operation of the schema (8 of them v1, 9 v2)
    assert "unresolvable reference" not in result.stdout, result.stdout[-3000:]  # the whole schema was generated from

    fuzzed: Counter[tuple[str, str]] = Counter()
    chains: Counter[int] = Counter()  # the status of each feedback that named the id its predict had just been issued
    for phase, case, interaction in recorded_cases(events):
        request, transition = case["value"], case.get("transition") or {}
        if phase == "fuzzing":
            fuzzed[request["method"], request["path"]] += 1
        if phase == "stateful" and transition.get("id") == FEEDBACK_LINK and interaction.get("response"):
            issued = transition["request_body"]["value"]["prediction_id"]  # read from the predict response
            sent = sent_json(interaction)
            if isinstance(sent, dict) and sent.get("prediction_id") == issued:
                chains[interaction["response"]["status_code"]] += 1
    document = httpx.get(f"{feedback_server.url}/openapi.json", timeout=30).raise_for_status().json()
    # an operation without inputs has one request to make, however many examples are asked for
    assert {op: n for op in operations_with_inputs(document) if (n := fuzzed[op]) < MAX_EXAMPLES} == {}, fuzzed
    # feedback on predictions the server had just made: stored (201), the same again (200), never unknown (404)
    assert chains[201] >= 5 and chains[200] >= 1 and not chains[404], (chains, result.stdout[-3000:])

"""Schemathesis against the running server's own OpenAPI schema: every generated request, valid or not, gets a
documented status, content type and body (never a 500), and the API key is really enforced."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import API_KEY

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


def test_schemathesis_finds_no_failures(server, tmp_path):
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis not found: pip install -e '.[dev]'"
    result = subprocess.run(
        [
            *(schemathesis, "run", f"{server.url}/openapi.json", "--checks", ",".join(CHECKS)),
            *("--header", f"X-API-Key: {API_KEY}", "--max-examples", "8", "--seed", "1", "--workers", "1"),
            *("--phases", "coverage,fuzzing", "--no-color", "--generation-database", "none"),
            *("--request-timeout", "20"),
        ],
        cwd=tmp_path,  # its cache folder stays out of the repository
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Tested: 17" in result.stdout, result.stdout[-3000:]  # every operation of the schema (8 of them v1, 9 v2)

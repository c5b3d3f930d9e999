"""The monitoring tests (monitoring/: alert rules, dashboards, a real Prometheus) scrape the service the serving tests
start with three variants and known traffic (tests/serve/conftest.py)."""

from tests.serve.conftest import ab_server, ab_traffic  # noqa: F401  (fixtures)

"""The service's /docs page in a real browser (tests/browser.py): it renders from the service's own copy of
Swagger UI, fetches nothing from another origin, and lists every operation of the OpenAPI document."""

from collections.abc import Iterator

import httpx
import pytest

from tests.browser import PAGE_TIMEOUT_S, headless_chromium, screenshot
from tests.serve.conftest import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a real server (a trained model) and a real browser

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with headless_chromium() as session:
        yield session


def documented_operations(server: Server) -> set[tuple[str, str]]:
    document = httpx.get(f"{server.url}/openapi.json", timeout=30).raise_for_status().json()
    return {
        (method.upper(), path) for path, item in document["paths"].items() for method in item if method in HTTP_METHODS
    }


def rendered_operations(browser) -> set[tuple[str, str]]:
    """(method, path) of each operation block Swagger UI has drawn."""
    blocks = browser.find_elements("css selector", ".opblock-summary")
    return {
        (
            block.find_element("css selector", ".opblock-summary-method").text,
            block.find_element("css selector", ".opblock-summary-path").get_attribute("data-path"),
        )
        for block in blocks
    }


def test_docs_renders_every_operation_from_local_assets(server: Server, browser) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    expected = documented_operations(server)
    assert ("POST", "/v1/predict") in expected and len(expected) >= 8, expected
    browser.get(f"{server.url}/docs")
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda page: rendered_operations(page) == expected)
    assert "cifarlab inference" in browser.find_element("tag name", "body").text
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
    assert fetched and all(url.startswith(server.url) for url in fetched), fetched  # no CDN
    assert any(url.endswith("swagger-ui-bundle.js") for url in fetched), fetched
    assert screenshot(browser, "serve-docs").stat().st_size > 10_000

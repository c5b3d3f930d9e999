"""Headless Chromium for the tests that look at a page as a user does: Debian's Chromium driven by selenium
through Debian's chromedriver (requirements/system-packages; `make system-deps`). Screenshots are kept in
build/browser/ as test artifacts."""

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ROOT

ARTIFACTS = ROOT / "build" / "browser"
PAGE_TIMEOUT_S = 60  # single-page apps (MLflow's UI, Swagger UI) take a while to render on a busy 2-core machine


@contextmanager
def headless_chromium() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium and chromedriver are missing: make system-deps"
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1200"):
        options.add_argument(argument)
    session = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield session
    finally:
        session.quit()


def page_text_once(browser, url: str, *expected: str) -> str:
    """Open `url` and wait until the page shows every `expected` text; returns the page's text."""
    browser.get(url)
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while True:
        text = browser.find_element("tag name", "body").text
        if all(part in text for part in expected) or time.monotonic() > deadline:
            return text
        time.sleep(1)


def screenshot(browser, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert browser.save_screenshot(str(path)), path
    return path

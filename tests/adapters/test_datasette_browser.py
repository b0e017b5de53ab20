"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium) against a real ``datasette`` server on loopback: both pages open,
their charts are drawn, the numbers shown are the CLI's. Screenshots go to
artifacts/datasette/ (CI keeps that folder; docs/hosts.md shows them)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from datasette.app import Datasette

from retention.cli import cli
from tests.adapters.dashboard import ALIAS, END, build

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("RETENTION_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "artifacts")) / "datasette"
SECRET = "a secret for the browser test only"
ANALYST = {"id": "analyst"}

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver; .ci/run installs them)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    db = build(folder)
    metadata = folder / "metadata.json"
    metadata.write_text(json.dumps(
        {"plugins": {"datasette-retention": {"allow-customers": ANALYST}}}))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "datasette", "serve", str(db), "--host", "127.0.0.1",
         "--port", str(port), "--metadata", str(metadata), "--secret", SECRET],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/-/versions.json", timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("datasette did not start: " + process.stdout.read().decode())
            time.sleep(0.05)
    try:
        yield url, db
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,2200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    url, _ = server
    # the analyst's actor cookie, signed as Datasette signs it with the server's secret
    driver.get(url + "/-/versions.json")
    driver.add_cookie({"name": "ds_actor", "path": "/",
                       "value": Datasette(secret=SECRET).sign({"a": ANALYST}, "actor")})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def cli_json(*args):
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def drawn(driver, element_id):
    """Waits for an <img> to load; its natural width, and the <path> elements of the
    SVG it shows (fetched again by the page, parsed by the browser)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = driver.find_element(By.ID, element_id)
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return arguments[0].complete", image))
    width = driver.execute_script("return arguments[0].naturalWidth", image)
    paths = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0].src, {credentials: 'same-origin'}).then(r => r.text())"
        ".then(t => done(new DOMParser().parseFromString(t, 'image/svg+xml')"
        ".querySelectorAll('path').length)).catch(e => done(-1));", image)
    return width, paths


def cells(driver, table_id):
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")
    return [[c.text for c in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def test_the_dashboard_in_chromium(server, browser):
    from selenium.webdriver.common.by import By

    url, db = server
    browser.get(f"{url}/-/retention?at={quote(END, safe='')}")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Retention"
    width, paths = drawn(browser, "retention-distribution")
    # 9 inches (648pt in the SVG) at the CSS 96 px an inch; the bars, axes, level lines
    assert width == 864 and paths > 20
    risky = cli_json("at-risk", "--db", str(db), "--at", END)
    assert [row[:3] for row in cells(browser, "retention-at-risk")] == [
        [r["customer"], r["level"], f"{r['capital']:.2f}"] for r in risky]
    plotted = cli_json("plot", "--db", str(db), "--distribution", "--at", END)
    assert cells(browser, "retention-levels")[:-1] == [
        [name, str(len(capitals))] for name, capitals in plotted["by_level"]]
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_a_customer_page_in_chromium(server, browser):
    from selenium.webdriver.common.by import By

    url, db = server
    browser.get(f"{url}/-/retention/customers/{quote(ALIAS, safe='')}?at={quote(END, safe='')}")
    shown = cli_json("customer", "--db", str(db), ALIAS, "--at", END)
    assert browser.find_element(By.ID, "retention-customer").text == shown["customer"]
    assert browser.find_element(By.ID, "retention-capital").text == f"{shown['capital']:.2f}"
    width, paths = drawn(browser, "retention-trajectory")
    assert width == 960 and paths > 20  # 10 inches
    assert [row[1] for row in cells(browser, "retention-ledger")] == \
        [f"{e['points']:.2f}" for e in shown["ledger"]]
    assert [row[4] for row in cells(browser, "retention-customer-decisions")] == \
        ["pending", "pending"]
    browser.save_screenshot(str(ARTIFACTS / "customer.png"))
    assert (ARTIFACTS / "customer.png").stat().st_size > 10_000


def test_a_browser_without_the_actor_sees_no_customer(server, browser):
    from selenium.webdriver.common.by import By

    url, _ = server
    browser.delete_cookie("ds_actor")
    try:
        browser.get(f"{url}/-/retention/customers/alice?at={quote(END, safe='')}")
        assert "retention-view-customers" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(f"{url}/-/retention?at={quote(END, safe='')}")
        assert {row[0] for row in cells(browser, "retention-at-risk")} == {"(hidden)"}
    finally:
        browser.add_cookie({"name": "ds_actor", "path": "/",
                            "value": Datasette(secret=SECRET).sign({"a": ANALYST}, "actor")})

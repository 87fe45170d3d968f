"""The failing report's HTML opened in a real headless Chromium (selenium + the distro chromedriver).

Needs the Debian packages `chromium` and `chromium-driver` (scripts/install-chromium.sh installs them) and
the pip package `selenium`; skipped with the reason when either is missing. No selenium-manager downloads:
the driver binary is given explicitly. Saves reports/screenshots/report.png (the first screen) and
reports/screenshots/report-full.png (the whole page).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from parity.report import write_reports
from parity.report.demo import demo_report

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "reports" / "screenshots"
CHROMIUM = os.environ.get("PARITY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PARITY_CHROMEDRIVER", "/usr/bin/chromedriver")

selenium = pytest.importorskip("selenium", reason="pip package 'selenium' is not installed (pip install selenium)")

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"headless Chromium not found ({CHROMIUM} / {CHROMEDRIVER}); run scripts/install-chromium.sh "
                f"(Debian packages chromium + chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def driver():
    profile = tempfile.mkdtemp(prefix="parity-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--window-size=1440,1000",
                 "--hide-scrollbars"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def failing_page(tmp_path_factory):
    report = demo_report(failing=True)
    paths = write_reports(report, tmp_path_factory.mktemp("browser-report"))
    return report, paths["html"]


def _wait_charts(drv, expected: int) -> None:
    WebDriverWait(drv, 60).until(
        lambda d: d.execute_script("return document.querySelectorAll('.js-plotly-plot .main-svg').length")
        >= expected)


def test_failing_report_in_chromium(driver, failing_page):
    report, html = failing_page
    driver.get(html.as_uri())
    n_figs = driver.execute_script("return document.querySelectorAll('script[data-figure]').length")
    assert n_figs >= 2 * len(report.cases)
    _wait_charts(driver, n_figs)

    # 1. no severe console errors
    logs = driver.get_log("browser")
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    assert not severe, json.dumps(severe, indent=1)

    # 2. the verdict banner: FAIL and the first divergence's layer / module, in the first screen
    status = driver.find_element(By.ID, "verdict-status").text
    sentence = driver.find_element(By.ID, "verdict-sentence").text
    assert status == "FAIL"
    d = report.first_divergence
    assert f"Layer {d.layer}" in sentence and d.module in sentence and d.cause in sentence
    top = driver.execute_script("return document.getElementById('verdict').getBoundingClientRect().top")
    assert top < 50

    # 3. plotly charts rendered: one plot per embedded figure, each with an svg and drawn traces
    n_plots = driver.execute_script("return document.querySelectorAll('.js-plotly-plot').length")
    assert n_plots >= 2 and n_plots == n_figs
    assert driver.execute_script(
        "return Array.from(document.querySelectorAll('.js-plotly-plot')).every("
        "p => p.querySelector('svg.main-svg') && p.data && p.data.length > 0)")
    assert driver.execute_script("return document.querySelectorAll('.js-plotly-plot .heatmaplayer image, "
                                 ".js-plotly-plot .heatmaplayer .hm').length") >= 1
    assert driver.execute_script("return document.querySelectorAll('.js-plotly-plot .scatterlayer .trace')"
                                 ".length") >= 4

    # 4. escaping: the model path's <script> is text, no script ran, no injected element exists
    assert "<script>alert(1)</script>" in driver.find_element(By.ID, "model-path").text
    assert driver.execute_script(
        "return Array.from(document.scripts).filter(s => s.textContent.includes('alert(1)')).length") == 0

    # 5. the first divergence row is marked in the module table
    row = driver.find_element(By.ID, "first-divergence")
    assert d.module in row.text and "first divergence" in row.text

    # 6. screenshots: first screen and whole page
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / "report.png"))
    assert (SHOTS / "report.png").stat().st_size > 10_000
    dims = driver.execute_script("return [document.documentElement.scrollWidth, "
                                 "document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": dims[0], "height": min(dims[1], 16000), "scale": 1}})
    (SHOTS / "report-full.png").write_bytes(base64.b64decode(shot["data"]))


def test_module_filter_in_chromium(driver, failing_page):
    _report, html = failing_page
    driver.get(html.as_uri())
    visible = "return Array.from(document.querySelectorAll('#modules-table tbody tr'))" \
              ".filter(r => r.style.display !== 'none').length"
    total = driver.execute_script(visible)
    driver.find_element(By.ID, "only-exceeded").click()
    shown = driver.execute_script(visible)
    assert 0 < shown < total
    assert not [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]

"""The page of `cxrkeras serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) uploads real NIH images and a DICOM file, and the table, the heatmaps and the JSON report appear."""

import json
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
from evalexport_helpers import sample_gray, write_dicom
from serve_helpers import SAMPLE_IMAGES

pytestmark = pytest.mark.timeout(300)

CHROMIUM = os.environ.get("CXRKERAS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CXRKERAS_CHROMEDRIVER") or shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1280,1600"]


def _browser(download_dir, profile_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": download_dir,
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": download_dir})
    return driver


def _wait(driver, condition, what, timeout=60):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        status = driver.find_element("id", "status").text
        raise AssertionError(f"the page did not show {what} within {timeout} s (status line: {status!r})") from None


def test_page_upload_table_heatmaps_and_report_in_chromium(server, serve_export, tmp_path, monkeypatch):
    assert CHROMIUM and CHROMEDRIVER, ("the browser test needs Chromium and its driver: apt-get install -y chromium "
                                       "chromium-driver (.ci/run installs them), or set CXRKERAS_CHROMIUM and "
                                       "CXRKERAS_CHROMEDRIVER")
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    png = os.path.join(SAMPLE_IMAGES, "00004296_000.png")
    dicom = write_dicom(str(tmp_path / "study.dcm"), sample_gray("00009745_000.png").astype(np.uint16) * 16)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    start = time.perf_counter()
    driver = _browser(str(downloads), tempfile.mkdtemp(dir=tmp_path, prefix="profile-"))
    try:
        driver.get(server.url + "/")
        _wait(driver, lambda d: "model tiny" in d.find_element(By.ID, "model-line").text, "the model line")
        assert "Research tool, not a medical device" in driver.find_element(By.ID, "notice").text
        assert "Youden's J thresholds chosen on the val split" in driver.find_element(By.ID, "model-details").text
        driver.find_element(By.ID, "files").send_keys("\n".join([png, dicom, str(text)]))  # several files at once
        driver.find_element(By.ID, "analyse").click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results article")) == 3, "three results")
        cards = driver.find_elements(By.CSS_SELECTOR, "#results article")
        assert "00004296_000.png" in cards[0].find_element(By.TAG_NAME, "h2").text
        assert "notes.txt" in cards[2].text and "Not analysed: not an image file" in cards[2].text
        thresholds = dict(zip(serve_export["labels"], serve_export["thresholds"]))
        for card in cards[:2]:
            rows = card.find_elements(By.CSS_SELECTOR, "table.labels tbody tr")
            assert len(rows) == 14
            cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
            probs = [float(c[1]) for c in cells]
            assert probs == sorted(probs, reverse=True) and len(set(probs)) > 1
            for label, prob, _, thr, finding in cells:
                assert float(thr) == pytest.approx(thresholds[label], abs=5e-4)
                if abs(float(prob) - thresholds[label]) > 1e-3:  # shown with 3 decimals
                    assert finding == ("yes" if float(prob) > thresholds[label] else "no"), (label, prob, thr)
        _wait(driver, lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#results img.heatmap')];"
            "return imgs.length === 6 && imgs.every(i => i.complete && i.naturalWidth > 300);"),
            "six rendered heatmap images (top 3 of two files)")
        preview_width = driver.execute_script("return document.querySelector('.preview img').naturalWidth")
        assert preview_width == 512
        elapsed = time.perf_counter() - start
        driver.find_element(By.ID, "download").click()
        _wait(driver, lambda d: (downloads / "cxrkeras-report.json").is_file(), "the downloaded report", 20)
        time.sleep(0.2)
        report = json.loads((downloads / "cxrkeras-report.json").read_text())
        assert [r["file"] for r in report["results"]] == ["00004296_000.png", "study.dcm", "notes.txt"]
        assert "preview" not in report["results"][0] and "image" not in report["results"][0]["heatmaps"][0]
        assert len(report["results"][0]["table"]) == 14 and report["model"]["thresholds"] == serve_export[
            "thresholds"]
        problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert problems == []  # no script error, no blocked (external) resource
    finally:
        driver.quit()
    print(f"browser: start, upload of 3 files, table and 6 heatmaps rendered in {elapsed:.1f} s")

"""Screenshot of the `cxrkeras serve` page after an upload (the README's picture), taken in headless Chromium.

Starts `cxrkeras serve --model MODEL` on a free loopback port, uploads the images in a real browser (Debian's
chromium + chromium-driver through Selenium), waits for the table and the heatmaps, and saves the whole page.
Usage: python tools/serve_screenshot.py [--model exports/demo] [--out cxrkeras/resources/serve_page.png] [IMAGE ...]
(`bash tools/demo.sh` makes exports/demo.)
"""

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, os.pardir))
DEFAULT_IMAGE = os.path.join(ROOT, "cxrkeras", "sample_data", "nih-512px", "images", "00009745_000.png")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="*", default=[DEFAULT_IMAGE])
    ap.add_argument("--model", default=os.path.join(ROOT, "exports", "demo"))
    ap.add_argument("--out", default=os.path.join(ROOT, "cxrkeras", "resources", "serve_page.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args(argv)
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        sys.exit("needs chromium and chromedriver: apt-get install -y chromium chromium-driver")
    if not os.path.exists(args.model):
        sys.exit(f"--model {args.model} does not exist (bash tools/demo.sh makes exports/demo)")
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from cxrkeras.serve.process import ServerProcess

    with ServerProcess(args.model) as server, tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in FLAGS + [f"--user-data-dir={profile}", f"--window-size={args.width},1000"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.get(server.url + "/")
            WebDriverWait(driver, 30).until(lambda d: not d.find_element(By.ID, "model-line").text.startswith("load"))
            top_k = driver.find_element(By.ID, "top-k")
            top_k.clear()
            top_k.send_keys(str(args.top_k))
            driver.find_element(By.ID, "files").send_keys("\n".join(os.path.abspath(p) for p in args.images))
            driver.find_element(By.ID, "analyse").click()
            WebDriverWait(driver, 120).until(lambda d: d.execute_script(
                "const imgs = [...document.querySelectorAll('#results img')];"
                "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
            for _ in range(2):  # the window's chrome takes some of its height: measure again after resizing
                height = driver.execute_script("return document.documentElement.scrollHeight")
                inner = driver.execute_script("return window.innerHeight")
                outer = driver.get_window_size()["height"]
                driver.set_window_size(args.width, height + (outer - inner))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(f"screenshot of the page after uploading {len(args.images)} image(s): {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

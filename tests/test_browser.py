"""The web page in a real browser: headless Chromium (Debian `chromium` + `chromium-driver`, installed
by .ci/run) driven by selenium against a live `lorasearch serve` on a free loopback port. Uploads a
demo PEFT adapter, checks the result table's top hits and match kinds, opens a row's details, the
"similar" view and the browse view, and takes a screenshot: into the temp folder, or where
LORASEARCH_SCREENSHOT says (the README's is made with
``LORASEARCH_SCREENSHOT=eval/results/serve_screenshot.png python -m pytest tests/test_browser.py``),
so running the suite leaves the working tree untouched."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "gallery"
SCREENSHOT = Path(os.environ.get("LORASEARCH_SCREENSHOT")
                  or Path(os.environ.get("TMPDIR", "/tmp")) / f"lorasearch-serve-{os.getpid()}.png")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

selenium = pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[dev]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")
pytestmark = [
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
                       reason="chromium / chromedriver missing (apt-get install -y chromium chromium-driver)"),
    pytest.mark.skipif(not DEMO.is_dir(), reason="demo collection not generated"),
]

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    index = tmp_path_factory.mktemp("browser") / "index"
    env = {**os.environ, "LORASEARCH_TOKEN": "browser-test-token-0123"}
    subprocess.run([sys.executable, "-m", "lorasearch.cli", "--index", str(index), "index", str(DEMO)],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "lorasearch.cli", "--index", str(index), "tag",
                    str(DEMO / "sentiment-01-copy"), "nsfw", "style:plain"], check=True, env=env, capture_output=True)
    port = _free_port()
    log = open(index.parent / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lorasearch.cli", "--index", str(index), "serve",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"lorasearch serve did not come up: {log.read()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        assert "Traceback" not in log.read()
        log.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1150", "--force-device-scale-factor=1"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#results-table tbody tr[data-id]")


def _table(driver) -> list[list[str]]:
    """The result rows' cell texts, read in one script call (no stale element references)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#results-table tbody tr[data-id]')]"
        ".map(r => [...r.cells].map(c => c.innerText.trim()))")


def test_upload_shows_the_expected_hits_then_similar_and_browse(server, browser):
    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(server + "/")
    wait.until(lambda d: "adapters" in d.find_element(By.ID, "stats").text)
    assert "28 adapters" in browser.find_element(By.ID, "stats").text

    # pick the two files of a PEFT folder, as a user would in the file dialog
    folder = DEMO / "sentiment-01"
    files = [str(folder / "adapter_config.json"), str(folder / "adapter_model.safetensors")]
    browser.find_element(By.ID, "file").send_keys("\n".join(files))
    wait.until(lambda d: len(_table(d)) >= 10)
    rows = _table(browser)
    names = [c[1].splitlines()[0] for c in rows]
    # ranks and labels come with the hits (no request per row); only the tagged copy has labels
    assert all(re.fullmatch(r"\d+(, \d+)*", c[6]) for c in rows), [c[6] for c in rows]
    assert [(n, c[7].split()) for n, c in zip(names, rows) if c[7]] == [("sentiment-01-copy", ["nsfw", "style:plain"])]
    assert set(names[:2]) == {"sentiment-01", "sentiment-01-copy"}
    assert [c[3] for c in rows[:3]] == ["exact", "exact", "same-update"] and names[2] == "sentiment-01-bf16"
    assert all(c[3] == "similar" for c in rows[3:])
    assert rows[0][0] == "1" and rows[0][4] == "minilm" and rows[0][5] == "peft" and rows[0][6] == "4"
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    # match kinds are coloured differently
    colours = {b.text: b.value_of_css_property("background-color")
               for b in browser.find_elements(By.CSS_SELECTOR, "#results-table .match")}
    assert len({colours["exact"], colours["same-update"], colours["similar"]}) == 3

    # details expand with the keyboard (the tagged copy's row: its labels are listed)
    toggle = _rows(browser)[names.index("sentiment-01-copy")].find_element(By.CSS_SELECTOR, "button[aria-expanded]")
    toggle.send_keys("\n")
    wait.until(lambda d: toggle.get_attribute("aria-expanded") == "true")
    details = browser.find_element(By.ID, toggle.get_attribute("aria-controls"))
    wait.until(lambda d: "sha256" in details.text)
    assert "trigger words" in details.text and "nsfw" in details.text and "style:plain" in details.text
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
    if not os.environ.get("LORASEARCH_SCREENSHOT"):
        SCREENSHOT.unlink()

    # a bad file: the API's one-line reason is shown
    bad = Path(os.environ.get("TMPDIR", "/tmp")) / f"lorasearch-browser-bad-{os.getpid()}.safetensors"
    bad.write_bytes(b"\x00" * 32)
    try:
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(EC.visibility_of_element_located((By.ID, "error")))
        assert bad.name in browser.find_element(By.ID, "error").text
    finally:
        bad.unlink()

    # "similar" view of the third hit, through its link
    link = _rows(browser)[2].find_element(By.CSS_SELECTOR, "td.name a")
    target_id = link.get_attribute("href").rsplit("/", 1)[-1]
    link.click()
    wait.until(lambda d: d.find_element(By.ID, "results-title").text.startswith(f"Adapters similar to #{target_id}"))
    wait.until(lambda d: len(_table(d)) >= 3 and _table(d)[0][1].endswith(f"#{target_id}"))

    # browse: filter by family, sort by name (descending)
    browser.find_element(By.ID, "nav-browse").click()
    wait.until(lambda d: d.find_element(By.ID, "results-title").text == "Indexed adapters")
    wait.until(lambda d: len(_table(d)) == 25)
    browser.find_element(By.CSS_SELECTOR, "#family option[value='minilm']").click()
    browser.find_element(By.CSS_SELECTOR, "#sort option[value='-name']").click()
    wait.until(lambda d: _table(d)[0][1] == "topic-06")
    assert "1–25 of 28" in browser.find_element(By.ID, "page-info").text
    browser.find_element(By.ID, "next").click()
    wait.until(lambda d: len(_table(d)) == 3)

"""The demo page end to end in a real browser: Debian's headless chromium, driven by selenium, against `c2f-app`
started on localhost. Upload a spoken description, click, and the page must show the images the library ranks first;
pick an image and it must offer the spoken captions the library ranks first.

Skipped only where chromium/chromedriver are not installed (`apt-get install chromium chromium-driver`); CI installs
them and sets C2F_REQUIRE_BROWSER=1, which turns that skip into a failure. C2F_APP_MODEL=DIR runs it on a trained
model (galleries: the demo test split) and C2F_APP_SCREENSHOT=PNG keeps the screenshot (the README's comes from it).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from c2f.cli import load_model
from c2f.data import load_demo
from c2f.retrieval import SpeechImageIndex

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("C2F_REQUIRE_BROWSER") == "1":
        raise RuntimeError("C2F_REQUIRE_BROWSER=1 but chromium/chromedriver are missing: apt-get install chromium chromium-driver")
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model dir, image index dir or None, audio index dir or None, url) of a running c2f-app."""
    trained = os.environ.get("C2F_APP_MODEL")
    folder = tmp_path_factory.mktemp("app")
    if trained:
        model_dir, image_index, audio_index = Path(trained), None, None
    else:  # a tiny random model: the page must show what the library ranks, whatever the model has learned
        from c2f.modeling_c2f import C2FSpeechImageModel
        from c2f.presets import tiny_config, tiny_processor

        torch.manual_seed(0)
        C2FSpeechImageModel(tiny_config()).save_pretrained(folder / "model")
        tiny_processor().save_pretrained(folder / "model")
        model_dir = folder / "model"
        model, processor = load_model(str(model_dir))
        rows = load_demo("test").select(range(0, 24, 3))
        image_index, audio_index = folder / "images", folder / "captions"
        SpeechImageIndex.build(model, processor, sorted(set(rows["image"])), "image", progress=False).save(image_index)
        SpeechImageIndex.build(model, processor, rows["audio"], "audio", progress=False).save(audio_index)
    port = _free_port()
    command = [sys.executable, "-m", "c2f.app", "--model", str(model_dir), "--port", str(port)]
    command += ["--image-index", str(image_index), "--audio-index", str(audio_index)] if image_index else []
    log = open(folder / "app.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"c2f-app did not start:\n{(folder / 'app.log').read_text()[-3000:]}")
                time.sleep(1)
        yield model_dir, image_index or model_dir / "demo_index" / "test-images", audio_index or model_dir / "demo_index" / "test-audios", url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1100", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _library_ranking(model_dir, index_dir, query) -> list[str]:
    model, processor = load_model(str(model_dir))
    return [Path(result["path"]).name for result in SpeechImageIndex.load(index_dir).search(model, processor, query)[0]]


def test_speech_query_shows_the_images_the_model_ranks_first(served, browser):
    model_dir, image_index, _, url = served
    clip = str(Path(load_demo("test")[0]["audio"]).resolve())
    expected = _library_ranking(model_dir, image_index, clip)
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    upload = wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#speech-query input[type=file]"))[0]
    upload.send_keys(clip)
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#speech-query audio, #speech-query wave, #speech-query [data-testid='waveform-controls']"))
    browser.find_element(By.CSS_SELECTOR, "#find-images").click()
    wait.until(lambda page: len(page.find_elements(By.CSS_SELECTOR, "#image-results img")) == len(expected))
    wait.until(lambda page: expected[0] in page.find_element(By.CSS_SELECTOR, "#image-scores").text)
    shown = [image.get_attribute("src") for image in browser.find_elements(By.CSS_SELECTOR, "#image-results img")]
    assert [src.rsplit("/", 1)[-1] for src in shown] == expected
    scores = browser.find_element(By.CSS_SELECTOR, "#image-scores").text
    assert scores.index(expected[0]) < scores.index(expected[1]) and "#1 score" in scores
    if os.environ.get("C2F_APP_SCREENSHOT"):
        browser.save_screenshot(os.environ["C2F_APP_SCREENSHOT"])


def test_image_query_offers_the_spoken_captions_the_model_ranks_first(served, browser):
    model_dir, image_index, audio_index, url = served
    image = SpeechImageIndex.load(image_index).records[0]["path"]
    expected = _library_ranking(model_dir, audio_index, image)
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    tab = wait.until(lambda page: [b for b in page.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Image" in b.text])[0]
    tab.click()
    upload = wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#image-query input[type=file]"))[0]
    upload.send_keys(image)
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#image-query img"))
    browser.find_element(By.CSS_SELECTOR, "#find-captions").click()
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#caption-1 audio, #caption-1 [data-testid='waveform-controls']"))
    first = browser.find_element(By.CSS_SELECTOR, "#caption-1")
    wait.until(lambda page: "#1 score" in first.text)
    assert "#1 score" in first.text
    assert expected[0] in first.text

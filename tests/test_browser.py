"""The app in a real browser: Debian's headless Chromium driven by Selenium through Debian's chromedriver
(no browser download). Opens each tab, uploads a clip in the Speech tab, transcribes it and checks that
text appears. Screenshots go to artifacts/browser/ (git-ignored).

With the tiny random-weight Whisper the text is nonsense, but it is text: the whole path from the page
through the queue, the model and back to the page works.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from test_serving import running

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = ROOT / "artifacts" / "browser"
# As the workplace's probe starts it: headless, and no background connections (the network is closed).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1100"]

if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(models_dir, tiny_whisper_ir, tiny_whisper_hf):
    with running(["--model", str(tiny_whisper_hf), "--models-dir", str(models_dir)]) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def chromium(extra_args: tuple[str, ...] = ()):
    """A headless Chromium driven by chromedriver, with a profile of its own (``extra_args`` added),
    for a fixture to yield; closed and its profile deleted after."""
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="voice-studio-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS + [f"--user-data-dir={profile}", *extra_args]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def open_tab(driver, title: str, shows: str) -> None:
    """Click the tab called ``title`` and wait until the text ``shows`` is visible in it."""
    wait = WebDriverWait(driver, 30)
    tab = wait.until(EC.element_to_be_clickable((By.XPATH, f"//button[@role='tab'][normalize-space()='{title}']")))
    tab.click()
    wait.until(lambda d: tab.get_attribute("aria-selected") == "true")
    wait.until(lambda d: any(e.is_displayed() for e in d.find_elements(By.XPATH, f"//*[normalize-space()='{shows}']")))


def test_three_tabs_and_a_transcription_in_a_real_browser(server, browser, english_clip):
    start = time.perf_counter()
    browser.get(server.url)
    WebDriverWait(browser, 60).until(EC.visibility_of_element_located((By.ID, "speech-run")))
    assert browser.title == "Voice Studio"
    shot(browser, "1-speech-tab")

    open_tab(browser, "Video to subtitles", "Make subtitles")
    shot(browser, "2-subtitles-tab")
    open_tab(browser, "Voice to pose-guided image", "Prompt from my voice")
    shot(browser, "3-image-tab")
    open_tab(browser, "Speech to text", "Transcribe")

    upload = browser.find_element(By.CSS_SELECTOR, "#speech-file input[type=file]")
    upload.send_keys(str(english_clip))
    WebDriverWait(browser, 60).until(  # the uploaded file is listed (name and extension in separate spans)
        lambda d: {english_clip.stem, english_clip.suffix} <= set(d.find_element(By.ID, "speech-file").text.split()))
    browser.find_element(By.ID, "speech-run").click()

    text_box = browser.find_element(By.CSS_SELECTOR, "#speech-text textarea")
    WebDriverWait(browser, 120).until(lambda d: text_box.get_attribute("value").strip())
    language = browser.find_element(By.CSS_SELECTOR, "#speech-language textarea, #speech-language input")
    WebDriverWait(browser, 10).until(lambda d: language.get_attribute("value").strip())
    path = shot(browser, "4-transcribed")
    print(f"browser test: {time.perf_counter() - start:.1f} s; screenshots in {path.parent}")
    assert text_box.get_attribute("value").strip()
    assert server.services.whisper.loaded_keys()  # the page's click reached the model
    assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.error")

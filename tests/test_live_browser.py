"""Live captions in a real browser (slow): Debian's headless Chromium with a fake microphone that plays a
spoken WAV file (``--use-fake-device-for-media-stream --use-file-for-fake-audio-capture``), the app with
the real bundled Whisper base. Live is started in the Speech tab, the paragraph's words appear in the
captions while the file plays, and stopping gives the whole text and the download files.

Chromium's fake device loops the file and may start anywhere in it, so the check is on the paragraph's
words, not on its first sentence. Screenshots go to artifacts/browser/ (git-ignored).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import SPEECH_CLIPS, normalised_words, write_wav
from test_browser import chromium, shot
from test_serving import running

pytestmark = pytest.mark.slow
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PARAGRAPH_WORDS = {w for w in normalised_words(SPEECH_CLIPS["english_long"]["text"]).split() if len(w) >= 5}


@pytest.fixture(scope="module")
def microphone_file(speech_clips, tmp_path_factory):
    from pipelines.speech.audio import load_audio

    audio = load_audio(speech_clips["english_long"]["path"])
    return write_wav(tmp_path_factory.mktemp("mic") / "paragraph.wav", np.concatenate([audio, np.zeros(16000, np.float32)]))


@pytest.fixture(scope="module")
def browser_with_microphone(microphone_file):
    """Chromium whose microphone plays ``microphone_file`` (its fake media device), allowed without asking."""
    yield from chromium(("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                         f"--use-file-for-fake-audio-capture={microphone_file}"))


def mic_button(driver, word: str):
    """The microphone's button saying ``word`` once it is shown, else False (for WebDriverWait: a button
    not rendered yet, e.g. right after the accordion opens, means "keep waiting", not an error)."""
    buttons = driver.find_elements(By.CSS_SELECTOR, "#live-mic button")
    found = next((b for b in buttons if word in (b.text + " " + (b.get_attribute("aria-label") or "")).lower()), None)
    return found if found is not None and found.is_displayed() else False


def heard(text: str) -> set[str]:
    return set(normalised_words(text).split()) & PARAGRAPH_WORDS


def test_live_captions_follow_a_fake_microphone_and_stop_gives_the_files(models_dir, browser_with_microphone):
    browser = browser_with_microphone
    with running(["--models-dir", str(models_dir), "--preload", "words"]) as server:
        browser.get(server.url)
        wait = WebDriverWait(browser, 60)
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#live-mode button"))).click()
        record = wait.until(lambda d: mic_button(d, "record"))
        deadline = time.monotonic() + 300
        while server.preload.state == "loading" and time.monotonic() < deadline:
            time.sleep(1)
        (mic_button(browser, "record") or record).click()
        start, seen = time.monotonic(), []
        while time.monotonic() - start < 45 and len(heard(seen[-1] if seen else "")) < 12:
            time.sleep(1)
            seen.append(browser.find_element(By.ID, "live-captions").text)
        shot(browser, "5-live-captions")
        print(f"captions after {time.monotonic() - start:.1f} s: {seen[-1]!r}")
        assert len(heard(seen[-1])) >= 12, seen[-1]  # the paragraph's words, while the file plays
        growth = [len(heard(s)) for s in seen]
        assert growth == sorted(growth) or max(growth) >= 12
        wait.until(lambda d: mic_button(d, "stop")).click()
        text_box = browser.find_element(By.CSS_SELECTOR, "#live-text textarea")
        WebDriverWait(browser, 300).until(lambda d: text_box.get_attribute("value").strip())
        files = WebDriverWait(browser, 60).until(
            lambda d: d.find_element(By.ID, "live-files").text.count("live") >= 4 and d.find_element(By.ID, "live-files"))
        shot(browser, "6-live-stopped")
        final = text_box.get_attribute("value")
        print(f"final: {final!r}")
        assert len(heard(final)) >= 12
        for suffix in (".srt", ".vtt", ".txt", ".json"):
            assert suffix in files.text
        assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.error")

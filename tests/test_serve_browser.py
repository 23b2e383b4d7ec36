"""The page in a real browser: headless Debian Chromium driven by Playwright against `hallolive-rt serve
--preset tiny` started here. The <video> plays the stream through Media Source Extensions as it is
generated (currentTime past 1 s, an audio and a video track decoded), a prompt switch mid-stream is
acknowledged and the blocks after it play too, no MSE, page or console error; a screenshot is written.

Skipped only where Chromium or Playwright is missing AND HALLOLIVE_REQUIRE_BROWSER is not 1 (.ci/run
sets it, so CI fails instead of skipping). HALLOLIVE_SCREENSHOT=path also copies the screenshot there
(how docs/serve-page.png was made)."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("HALLOLIVE_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("HALLOLIVE_REQUIRE_BROWSER") == "1"
# flags that work as root in a closed network (no sandbox, no GPU, nothing phoned home)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


def _browser_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium, or set HALLOLIVE_CHROMIUM)")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if REQUIRED:
            pytest.fail(msg + " (HALLOLIVE_REQUIRE_BROWSER=1: not skipping)")
        pytest.skip(msg)


@pytest.fixture
def server_url(request):
    """`hallolive-rt serve` on a free loopback port, as a user starts it (extra flags: the test's param);
    stopped with Ctrl-C (SIGINT)."""
    _browser_or_skip()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("HALLOLIVE_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "hallolive_rt.cli", "serve", "--preset", "tiny", "--port", "0",
                             "--log-level", "warning", *getattr(request, "param", ())],  # a newcomer's defaults
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def pump():
        for line in proc.stderr:
            log.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    url, deadline = None, time.monotonic() + 180
    while url is None:
        try:
            m = re.search(r"live sessions at (\S+)", lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            break
        url = m and m.group(1)
    try:
        assert url, f"the server did not start: {''.join(log)[-3000:]}"
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        assert rc == 0, f"serve exited with {rc}: {''.join(log)[-3000:]}"


def _wait(page, js: str, timeout: float, what: str):
    """Poll a JS expression (page.wait_for_function evaluates strings, which the page's CSP forbids)."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(js)
        if value:
            return value
        errors = page.evaluate("window.hallolive ? window.hallolive.errors : []")
        assert not errors, f"page errors while waiting for {what}: {errors}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)

def _stop(page, more: str = "") -> dict:
    """Press Stop, wait for the session's end; the page's errors, event types and ``more`` fields."""
    page.click("#stop")
    _wait(page, "window.hallolive.ended && document.getElementById('status').textContent === 'ended'", 60,
          "the end of the session")
    return page.evaluate(f"({{{more}errors: window.hallolive.errors, "
                         f"types: window.hallolive.events.map(e => e.type)}})")


MEDIA = """() => { const v = document.getElementById('video'); const s = v.captureStream();
  return {t: v.currentTime, paused: v.paused, error: v.error && v.error.message,
          audioTracks: s.getAudioTracks().length, videoTracks: s.getVideoTracks().length,
          audioBytes: v.webkitAudioDecodedByteCount, videoBytes: v.webkitVideoDecodedByteCount,
          frames: v.getVideoPlaybackQuality().totalVideoFrames,
          buffered: Array.from({length: v.buffered.length}, (_, i) => [v.buffered.start(i), v.buffered.end(i)])}; }"""


def test_page_plays_the_live_stream_and_switches_prompt(server_url, tmp_path):
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "serve-page.png"
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)  # a fresh temporary profile
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(server_url)
            assert page.evaluate("MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.64000a, mp4a.40.2\"')"), \
                "this Chromium cannot play H.264 + AAC through MSE"
            page.click("#start")  # endless: blocks empty
            _wait(page, "window.hallolive.appended >= 3", 120, "the init segment and two blocks")
            page.click("#switch")
            k = _wait(page, "(() => { const p = window.hallolive.prompts[1]; "
                            "return p && p.from_block != null && {k: p.from_block}; })()", 60,
                      "the prompt switch to be applied")["k"]
            # the blocks after the switch arrive and play: the playhead passes the switch block's start
            switch_t = (5 + 8 * (k - 1)) / 25
            t = _wait(page, f"(() => {{ const t = document.getElementById('video').currentTime; "
                            f"return t > Math.max(1.0, {switch_t} + 0.2) && t; }})()", 180,
                      f"playback past 1 s and past block {k} (t = {switch_t:.2f} s)")
            media = page.evaluate(MEDIA)
            page.screenshot(path=str(shot))
            blocks_after = page.evaluate(f"window.hallolive.events.filter(e => e.type === 'block' && "
                                         f"e.index >= {k} && e.prompt_id === 1).length")
            final = _stop(page, "acked: window.hallolive.acked, ")
        finally:
            browser.close()
    print(f"playhead {t:.2f} s, switch applied from block {k}, media {media}")
    assert t > 1.0 and not media["paused"] and media["error"] is None
    assert media["audioTracks"] == 1 and media["videoTracks"] == 1
    assert media["audioBytes"] > 0 and media["videoBytes"] > 0 and media["frames"] >= 25
    assert media["buffered"] and media["buffered"][-1][1] > switch_t
    assert blocks_after >= 1
    assert final["errors"] == [] and problems == [], (final["errors"], problems)
    assert final["types"][-2:] == ["tail", "end"] and final["acked"] >= k
    assert shot.stat().st_size > 10_000
    dest = os.environ.get("HALLOLIVE_SCREENSHOT")
    if dest:
        shutil.copyfile(shot, Path(dest))


@pytest.mark.parametrize("server_url", [("--webrtc",)], indirect=True)
def test_page_plays_the_webrtc_call_and_switches_prompt(server_url, tmp_path):
    """The WebRTC transport chosen on the page: a video and an audio track arrive and play past 1 s (frames
    rendered, counted by requestVideoFrameCallback), a prompt switch on the data channel is applied."""
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "webrtc-page.png"
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(server_url)
            _wait(page, "!document.querySelector('#transport option[value=webrtc]').disabled", 10,
                  "the page to learn that WebRTC is offered")
            page.select_option("#transport", "webrtc")
            page.click("#start")
            _wait(page, "window.hallolive.framesRendered >= 5", 120, "frames rendered from the video track")
            page.click("#switch")
            k = _wait(page, "(() => { const p = window.hallolive.prompts[1]; "
                            "return p && p.from_block != null && {k: p.from_block}; })()", 60,
                      "the prompt switch to be applied")["k"]
            t = _wait(page, "(() => { const t = document.getElementById('video').currentTime; "
                            "return t > 1.2 && window.hallolive.framesRendered >= 30 && t; })()", 120,
                      "playback past 1 s")
            tracks = page.evaluate("(() => { const s = document.getElementById('video').srcObject; "
                                   "return {audio: s.getAudioTracks().length, video: s.getVideoTracks().length, "
                                   "frames: window.hallolive.framesRendered, "
                                   "ttff_ms: window.hallolive.firstFrameMs}; })()")
            page.screenshot(path=str(shot))
            final = _stop(page)
        finally:
            browser.close()
    print(f"WebRTC: playhead {t:.2f} s, switch from block {k}, {tracks}")
    assert tracks["audio"] == 1 and tracks["video"] == 1 and tracks["frames"] >= 30 and tracks["ttff_ms"] > 0
    assert final["errors"] == [] and problems == [], (final["errors"], problems)
    assert final["types"][-1] == "end" and "prompt_applied" in final["types"]
    assert shot.stat().st_size > 10_000
    dest = os.environ.get("HALLOLIVE_SCREENSHOT_WEBRTC")
    if dest:
        shutil.copyfile(shot, Path(dest))

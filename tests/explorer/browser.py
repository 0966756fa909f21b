"""A headless Chromium for the explorer's browser tests, benchmark and screenshots.

Debian's ``/usr/bin/chromium`` is driven through ``/usr/bin/chromedriver`` with selenium 4; both
paths are given explicitly so selenium-manager never looks for (or downloads) a browser. The
browser cannot reach the network: every host name resolves to nothing except 127.0.0.1, every
request goes to a proxy on the discard port (127.0.0.1:9, nothing listens there) unless it is for
127.0.0.1, and a page opened from disk additionally runs with DevTools' network emulation set to
offline. Every request a page makes is recorded from the performance log (DevTools ``Network``
events), so a test asserts what left the page instead of trusting that nothing could.

Console errors (uncaught exceptions, ``console.error``) are collected per page; the tests fail on
any of them.

>>> browser = Browser()                                        # doctest: +SKIP
>>> page = browser.open_file(path)                             # doctest: +SKIP
>>> page.left_page(), page.console_errors()                    # doctest: +SKIP
([], [])
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: Launch flags: headless, no first-run work, nothing contacted in the background, no QUIC (which
#: would bypass the proxy), and no name resolution or direct connection except to 127.0.0.1.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-quic",
    "--disable-features=MediaRouter,OptimizationHints,Translate,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1",
)

#: Schemes that never reach the network: a page may use them freely (a canvas exported as a
#: ``data:`` PNG, an object URL).
LOCAL_SCHEMES = ("data:", "blob:", "about:")


#: Installed in every document before its scripts: records ``performance.now()`` (ms since the
#: navigation started) when ``attnExplorer.ready`` resolves, whenever the page assigns it.
READY_PROBE = """
(() => {
  let explorer;
  Object.defineProperty(window, 'attnExplorer', {
    configurable: true, enumerable: true,
    get() { return explorer; },
    set(value) {
      explorer = value;
      (function watch() {
        if (explorer && explorer.ready && typeof explorer.ready.then === 'function') {
          explorer.ready.then(() => { if (window.__afReadyAt === undefined) window.__afReadyAt = performance.now(); });
        } else { setTimeout(watch, 0); }
      })();
    }
  });
})();
"""


class BrowserMissing(RuntimeError):
    """Chromium or its driver is not installed: the browser tests fail (they never skip)."""


def require_chromium() -> None:
    """Raise :class:`BrowserMissing` with the install command when chromium or chromedriver is absent."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        raise BrowserMissing(
            f"the explorer's browser tests need Debian's chromium and its driver; missing: {', '.join(missing)} "
            "(install with: sudo apt-get install chromium chromium-driver)")


@dataclass
class Page:
    """What one navigation recorded: the URL, the requests the page made and its console messages.

    Timings are ms: ``first_render_ms`` is the page's own ``attnExplorer.firstRenderMs``;
    ``ready_at_ms`` is when ``attnExplorer.ready`` resolved, counted from the start of the
    navigation (so it includes loading and parsing the HTML); ``navigation`` holds the browser's
    navigation timing (DOMContentLoaded, load event).
    """

    url: str
    browser: "Browser"
    requests: list[str] = field(default_factory=list)
    console: list[dict] = field(default_factory=list)
    navigation: dict = field(default_factory=dict)
    first_render_ms: float | None = None
    ready_seen_ms: float | None = None
    ready_at_ms: float | None = None

    def refresh_logs(self) -> "Page":
        """Drain the browser's logs into :attr:`requests` and :attr:`console` (call after interacting)."""
        self.browser._drain(self)
        return self

    def left_page(self, allowed_origin: str | None = None) -> list[str]:
        """Requests other than the page itself, ``data:``/``blob:`` URLs and, when given, URLs
        under ``allowed_origin`` (``"http://127.0.0.1:PORT"``): what went out to the network or
        to another file."""
        self.refresh_logs()
        page_url = self.url.split("#")[0]
        out = []
        for url in self.requests:
            if url.split("#")[0] == page_url or url.startswith(LOCAL_SCHEMES):
                continue
            if allowed_origin and (url == allowed_origin or url.startswith(allowed_origin.rstrip("/") + "/")):
                continue
            out.append(url)
        return out

    def console_errors(self) -> list[str]:
        """Console messages at level SEVERE (uncaught exceptions, ``console.error``, failed loads)."""
        self.refresh_logs()
        return [entry["message"] for entry in self.console if entry.get("level") == "SEVERE"]


class Browser:
    """One headless Chromium; :meth:`open_file` / :meth:`open_url` return a :class:`Page`.

    Parameters
    ----------
    width, height
        Window size in CSS pixels.
    """

    def __init__(self, *, width: int = 1280, height: int = 900):
        require_chromium()
        # Both paths are explicit, so selenium-manager has nothing to find; should it run anyway, offline.
        os.environ.setdefault("SE_OFFLINE", "true")
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="attnformat-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        options.add_experimental_option("perfLoggingPrefs", {"enableNetwork": True, "enablePage": False})
        service = Service(CHROMEDRIVER, log_output=os.devnull)
        try:
            self.driver = webdriver.Chrome(service=service, options=options)
        except Exception:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise
        self.driver.set_script_timeout(120)
        self.driver.set_page_load_timeout(120)
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.add_init_script(READY_PROBE)
        self._offline = None
        self._page: Page | None = None

    # -- navigation --

    def set_offline(self, offline: bool) -> None:
        """Switch DevTools' network emulation (offline: no request of any kind succeeds)."""
        if offline != self._offline:
            self.driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
                "offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
            self._offline = offline

    def open_file(self, path, *, wait: bool = True, timeout: float = 60) -> Page:
        """Open an HTML file from disk with the network off; wait for ``attnExplorer.ready``."""
        self.set_offline(True)
        return self._open(Path(path).resolve().as_uri(), wait=wait, timeout=timeout)

    def open_url(self, url: str, *, wait: bool = True, timeout: float = 60) -> Page:
        """Open a page from a server on 127.0.0.1 (other hosts cannot be reached either way)."""
        self.set_offline(False)
        return self._open(url, wait=wait, timeout=timeout)

    def _open(self, url: str, *, wait: bool, timeout: float) -> Page:
        self.driver.get("about:blank")
        self._drain(None)  # forget what earlier pages logged
        page = Page(url=url, browser=self)
        self._page = page
        self.driver.get(url)
        if wait:
            page.first_render_ms = self.wait_ready(timeout)
            page.ready_at_ms = self.driver.execute_script("return window.__afReadyAt === undefined ? null : window.__afReadyAt;")
        page.navigation = self.driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return n ? {domContentLoaded: n.domContentLoadedEventEnd, load: n.loadEventEnd,"
            " responseEnd: n.responseEnd, transferSize: n.transferSize, decodedBodySize: n.decodedBodySize} : {};")
        return page.refresh_logs()

    def wait_ready(self, timeout: float = 60) -> float:
        """Wait until ``attnExplorer.ready`` resolves; return ``attnExplorer.firstRenderMs``.

        A rejected promise, a missing ``attnExplorer`` or a timeout raise ``AssertionError``
        carrying the page's console errors."""
        result = self.driver.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            const limit = Date.now() + arguments[0];
            (function poll() {
              if (window.attnExplorer && window.attnExplorer.ready) {
                window.attnExplorer.ready.then(
                  () => done({ok: true, ms: window.attnExplorer.firstRenderMs, now: performance.now()}),
                  (e) => done({ok: false, error: String(e && e.stack || e)}));
              } else if (Date.now() > limit) {
                done({ok: false, error: 'window.attnExplorer.ready never appeared'});
              } else { setTimeout(poll, 20); }
            })();
            """, int(timeout * 1000))
        if not result.get("ok"):
            errors = self._page.console_errors() if self._page else []
            raise AssertionError(f"explorer page did not become ready: {result.get('error')}; console errors: {errors}")
        if self._page is not None:
            self._page.ready_seen_ms = result.get("now")
        return result.get("ms")

    def add_init_script(self, source: str) -> str:
        """Run ``source`` in every new document before its own scripts; returns an id for
        :meth:`remove_init_script`."""
        return self.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": source})["identifier"]

    def remove_init_script(self, identifier: str) -> None:
        self.driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": identifier})

    # -- helpers for tests --

    def js(self, script: str, *args):
        """Run ``script`` (a function body; ``arguments`` are ``args``) in the page."""
        return self.driver.execute_script(script, *args)

    def js_async(self, expression: str, *args):
        """Evaluate ``expression`` (may return a Promise; ``args`` as ``arguments``) and return its value."""
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const args = Array.prototype.slice.call(arguments, 0, -1);"
            f"Promise.resolve().then(() => (function() {{ return {expression}; }}).apply(null, args))"
            ".then(v => done({ok: true, value: v}), e => done({ok: false, error: String(e && e.stack || e)}));",
            *args)
        if not result["ok"]:
            raise AssertionError(f"page script failed: {result['error']}")
        return result["value"]

    def set_state(self, **state):
        """``attnExplorer.setState(state)`` and wait for the re-render."""
        return self.js_async("window.attnExplorer.setState(arguments[0]).then(() => null)", state)

    def hover(self, element) -> None:
        """Move the (virtual) mouse onto ``element``: real pointer events, as a user makes them."""
        from selenium.webdriver.common.action_chains import ActionChains

        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'});", element)
        ActionChains(self.driver, duration=0).move_to_element(element).perform()

    def hover_at(self, element, x: float, y: float) -> None:
        """Move the mouse to offset ``(x, y)`` CSS pixels from ``element``'s top-left corner."""
        from selenium.webdriver.common.action_chains import ActionChains

        # Bring the point itself (not just the element, which may be taller than the window) into view.
        rect = self.driver.execute_script(
            "const e = arguments[0], r = e.getBoundingClientRect();"
            "window.scrollBy(r.left + arguments[1] - innerWidth / 2, r.top + arguments[2] - innerHeight / 2);"
            "const s = e.getBoundingClientRect(); return {width: s.width, height: s.height};", element, x, y)
        ActionChains(self.driver, duration=0).move_to_element_with_offset(
            element, int(round(x - rect["width"] / 2)), int(round(y - rect["height"] / 2))).perform()

    def click(self, element) -> None:
        """Click ``element`` with a real mouse click."""
        from selenium.webdriver.common.action_chains import ActionChains

        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'});", element)
        ActionChains(self.driver, duration=0).move_to_element(element).click().perform()

    def select(self, css: str, value: str) -> None:
        """Choose ``value`` in the ``<select>`` at ``css`` as a user would (fires ``change``)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        Select(self.driver.find_element(By.CSS_SELECTOR, css)).select_by_value(str(value))

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait_for(self, script: str, *args, timeout: float = 30, interval: float = 0.02):
        """Poll ``script`` (a function body) until it returns something truthy; return that."""
        limit = time.monotonic() + timeout
        while True:
            value = self.driver.execute_script(script, *args)
            if value:
                return value
            if time.monotonic() > limit:
                raise AssertionError(f"timed out waiting for: {script}")
            time.sleep(interval)

    def screenshot(self, path, *, full_page: bool = True) -> Path:
        """Save a PNG of the page: the whole document (``full_page``) or the viewport."""
        import base64

        path = Path(path)
        if not full_page:
            self.driver.save_screenshot(str(path))
            return path
        size = self.driver.execute_script(
            "const d = document.documentElement; return {width: Math.max(d.scrollWidth, innerWidth), height: d.scrollHeight};")
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    # -- logs --

    def _drain(self, page: Page | None) -> None:
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent" and page is not None:
                page.requests.append(message["params"]["request"]["url"])
        for entry in self.driver.get_log("browser"):
            if page is not None:
                page.console.append(entry)

    def close(self) -> None:
        """Quit the browser and its driver; remove the temporary profile."""
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- reading the explorer's DOM (the contract in viewer/explorer/page.py) --

def token_labels(browser: Browser, side: str) -> list[str]:
    """``textContent`` of the token view's tokens on ``side`` ("query" or "key"), in index order."""
    return browser.js(
        "return Array.from(document.querySelectorAll('span.af-token[data-side=\"' + arguments[0] + '\"]'))"
        ".sort((a, b) => a.dataset.index - b.dataset.index).map(e => e.textContent);", side)


def token_weights(browser: Browser, side: str) -> dict[int, str | None]:
    """``{index: data-weight}`` of every token on ``side`` (None when the attribute is absent)."""
    rows = browser.js(
        "return Array.from(document.querySelectorAll('span.af-token[data-side=\"' + arguments[0] + '\"]'))"
        ".map(e => [Number(e.dataset.index), e.hasAttribute('data-weight') ? e.dataset.weight : null]);", side)
    return {int(index): weight for index, weight in rows}


def shown_number(text: str | None) -> float:
    """A number as the page shows it; NaN for an absent, empty or non-numeric value ("–", "NaN")."""
    if text is None:
        return float("nan")
    text = text.strip().replace("\u2212", "-")
    try:
        return float(text)
    except ValueError:
        return float("nan")


def rounding_of(text: str) -> float:
    """Half a unit in the last digit ``text`` shows: what printing it may have rounded away."""
    text = text.strip().replace("\u2212", "-").lower()
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def mismatches(shown: dict, truth, tolerance: float) -> list[str]:
    """Where the shown strings ``{index: text}`` differ from ``truth[index]`` by more than
    ``tolerance`` plus the text's own rounding; NaN in the truth must be shown as no number."""
    import math

    bad = []
    if sorted(shown) != list(range(len(truth))):
        return [f"indices shown {sorted(shown)[:8]}... != 0..{len(truth) - 1}"]
    for index, text in shown.items():
        expected = float(truth[index])
        value = shown_number(text)
        if math.isnan(expected):
            if not math.isnan(value):
                bad.append(f"[{index}] shows {text!r}, file has NaN (masked/absent)")
        elif math.isnan(value) or abs(value - expected) > tolerance + rounding_of(text) + 1e-12:
            bad.append(f"[{index}] shows {text!r}, file has {expected:.7g} (tolerance {tolerance:.3g})")
    return bad

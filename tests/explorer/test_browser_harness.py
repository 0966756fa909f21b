"""The harness's own proof: the checks the explorer's browser tests rely on can fail.

A page that reaches for the network, loads another local file and throws must be caught by
``left_page`` and ``console_errors``; otherwise "no request left the page" would prove nothing.
"""

from __future__ import annotations

import http.server
import threading
from functools import partial

PAGE = """<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>
<img src="https://cdn.example.com/x.png"><img src="other.png"><img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">
<script>
fetch('http://198.51.100.7/beacon').catch(() => {});
window.attnExplorer = {ready: Promise.resolve(), firstRenderMs: 1};
throw new Error('deliberate');
</script></body></html>"""


def test_harness_sees_every_request_and_error(browser, tmp_path):
    page_file = tmp_path / "leaky.html"
    page_file.write_text(PAGE, encoding="utf-8")
    page = browser.open_file(page_file)
    left = page.left_page()
    assert "https://cdn.example.com/x.png" in left and "http://198.51.100.7/beacon" in left
    assert (tmp_path / "other.png").as_uri() in left  # another file is not the page either
    assert not any(url.startswith("data:") for url in left)
    assert any("deliberate" in message for message in page.console_errors())

    # Served: 127.0.0.1 is allowed, everything else is recorded (and cannot be reached).
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        origin = f"http://127.0.0.1:{server.server_address[1]}"
        page = browser.open_url(f"{origin}/leaky.html")
        left = page.left_page(origin)
        assert "https://cdn.example.com/x.png" in left and "http://198.51.100.7/beacon" in left
        assert f"{origin}/other.png" not in left
        assert browser.js("return document.images[0].complete && document.images[0].naturalWidth;") == 0  # never loaded
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

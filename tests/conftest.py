"""Shared test set-up: example files are built once per session into a temporary folder; a local
HTTP server and a moto S3 server (both on 127.0.0.1, started on first use) serve remote reads."""

from __future__ import annotations

import functools
import http.server
import io
import logging
import os
import re
import tempfile
import threading

import matplotlib
import pytest

matplotlib.use("Agg")

# Examples land in a per-run folder so tests never depend on files from an earlier run.
os.environ.setdefault("ATTNFORMAT_EXAMPLES_DIR", tempfile.mkdtemp(prefix="attnformat-test-examples-"))
# Remembered conformance verdicts (attnformat.verdicts) stay inside this run too.
os.environ.setdefault("ATTNFORMAT_CACHE_DIR", tempfile.mkdtemp(prefix="attnformat-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# -- servers for remote reads: started once per session, on 127.0.0.1 only, stopped at the end --

S3_BUCKET = "attnformat-test"


class _RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """The standard library's file server, plus single byte ranges as real web servers answer them
    (fsspec reads HDF5 files and zip archives over HTTP in ranges)."""

    def log_message(self, *args):
        pass

    def send_head(self):
        header = self.headers.get("Range", "")
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
        if not match or not os.path.isfile(path) or match.groups() == ("", ""):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = match.groups()
        if first == "":
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
        if start >= size:
            self.send_error(416)
            return None
        with open(path, "rb") as handle:
            handle.seek(start)
            body = handle.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(body)


@pytest.fixture(scope="session")
def http_root(tmp_path_factory):
    """``(base URL, folder)``: a local HTTP server on 127.0.0.1 serving ``folder`` for the session."""
    folder = tmp_path_factory.mktemp("http-root")
    handler = functools.partial(_RangeRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="session")
def s3_endpoint():
    """Endpoint URL of a moto S3 server on 127.0.0.1 (port chosen by the system) with one empty
    bucket, :data:`S3_BUCKET`; dummy credentials are set for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            s3_filesystem(endpoint).mkdir(S3_BUCKET)
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_storage_options(s3_endpoint):
    """``storage_options`` that reach the test server: endpoint and credentials, given explicitly
    (they travel with every request, also to helper processes started before the server)."""
    return {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}


def s3_filesystem(endpoint: str):
    """An s3fs filesystem on the test server (not cached, so no state leaks between tests)."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_put(s3_endpoint):
    """``put(local_path, key) -> "s3://bucket/key"``: upload a file or a whole store directory."""
    filesystem = s3_filesystem(s3_endpoint)

    def put(local, key: str) -> str:
        local = os.fspath(local)
        sources, targets = [local], [f"{S3_BUCKET}/{key}"]
        if os.path.isdir(local):
            sources = [os.path.join(folder, name) for folder, _, names in os.walk(local) for name in names]
            targets = [f"{S3_BUCKET}/{key}/" + os.path.relpath(file, local).replace(os.sep, "/") for file in sources]
        filesystem.put(sources, targets)  # one call: the uploads run concurrently
        return f"s3://{S3_BUCKET}/{key}"

    return put

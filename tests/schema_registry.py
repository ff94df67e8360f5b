"""A real Schema Registry for the DECODE tests, and a proxy in front of it that the tests steer.

Apicurio Registry 2.4.2 (built by `make registry` into .cache/registry) serves the
Confluent-compatible API under /apis/ccompat/v7, in memory. It accepts any credentials, so
RegistryProxy enforces basic auth itself, counts the requests that reach it (each schema id
is fetched once), and is stopped and started again on the same port for an outage.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JAR = ROOT / ".cache" / "registry" / "apicurio-test-registry-1-runner.jar"
API = "/apis/ccompat/v7"


def registry_jar() -> Path | None:
    """The runner jar named by SPOUT_TEST_REGISTRY (make test-registry), else None."""
    named = os.environ.get("SPOUT_TEST_REGISTRY")
    return Path(named) if named else None


class Apicurio:
    """The registry as a Java process on a loopback port; in memory, gone when stopped."""

    def __init__(self, jar: Path, port: int, log_path: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}{API}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        started = time.monotonic()
        # Small heap, no C2: it serves a few hundred requests, starts in about 3 s.
        self.process = subprocess.Popen(
            ["java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-Dquarkus.http.host=127.0.0.1", f"-Dquarkus.http.port={port}", "-jar", str(jar)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=jar.parent)
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() - started > 60:
                self.stop()
                raise RuntimeError(f"Apicurio did not start; see {log_path}")
            time.sleep(0.1)
        self.startup_seconds = time.monotonic() - started

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class RegistryProxy:
    """GETs forwarded to the registry; basic auth enforced when user_info is set (anything
    else is answered `refusal`: 401, or 403 as registries answer a known user without the
    right); HTTPS when given a PEM file holding its key and certificate chain."""

    def __init__(self, upstream: str, port: int, user_info: str | None = None,
                 certfile: Path | None = None, refusal: int = 401):
        self.upstream = upstream.rstrip("/")
        self.port = port
        self.url = f"{'https' if certfile else 'http'}://127.0.0.1:{port}{API}"
        self.user_info = user_info
        self.certfile = certfile
        self.refusal = refusal
        self.requests: list[str] = []
        self._server = None
        self._lock = threading.Lock()

    def start(self) -> RegistryProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with proxy._lock:
                    proxy.requests.append(self.path)
                if proxy.user_info is not None:
                    expected = "Basic " + base64.b64encode(proxy.user_info.encode()).decode()
                    if self.headers.get("Authorization") != expected:
                        message = "Unauthorized" if proxy.refusal == 401 else "Forbidden"
                        self._answer(proxy.refusal, json.dumps({
                            "error_code": proxy.refusal * 100 + 1,
                            "message": message}).encode())
                        return
                path = self.path[len(API):] if self.path.startswith(API) else self.path
                try:
                    with urllib.request.urlopen(proxy.upstream + path, timeout=10) as response:
                        self._answer(response.status, response.read())
                except urllib.error.HTTPError as error:
                    self._answer(error.code, error.read())

            def _answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        if self.certfile is not None:
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.certfile)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Closes the port: the spout's connections are refused until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fetched_ids(self) -> list[int]:
        with self._lock:
            return [int(path.split("/schemas/ids/")[1].split("?")[0].split("/")[0])
                    for path in self.requests if "/schemas/ids/" in path]

"""A counting proxy in front of the S3 test server: every request a client sends to it is counted
(method, and LIST for a GET of a bucket with list-type) and forwarded; what the tests count as the
requests of a rerun."""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.servers import LOOPBACK, S3Server


class CountingProxy:
    """``CountingProxy(server).endpoint``: an S3 endpoint that counts requests (``counts``)."""

    def __init__(self, upstream: S3Server) -> None:
        self.counts: Counter[str] = Counter()
        self.keys: list[tuple[str, str]] = []
        target = urlsplit(upstream.endpoint)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path, _, query = self.path.partition("?")
                kind = "LIST" if self.command == "GET" and ("list-type" in query or path.count("/") <= 1) else self.command
                proxy.counts[kind] += 1
                proxy.keys.append((kind, path))
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.endpoint = f"http://{LOOPBACK}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def server(self) -> S3Server:
        return S3Server(self.endpoint)

    def reset(self) -> None:
        self.counts.clear()
        self.keys.clear()

    def close(self) -> None:
        self.httpd.shutdown()

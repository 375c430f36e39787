"""A small S3-compatible server for tests: one access key, buckets in memory, and every
request's AWS Signature V4 checked — pre-signed URLs (query) and signed headers alike.

Written from the SigV4 specification, independently of the MinIO SDK that signs the
requests, so a URL the operator signs wrongly (another key, region, method, key name, or
an expired one) is refused here with 403, as a real store would.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit

ACCESS_KEY = "AKIATESTOPERATOR0001"
SECRET_KEY = "operator-secret-key-never-on-a-trainer"
REGION = "us-east-1"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _signature(secret: str, date: str, region: str, string_to_sign: str) -> str:
    key = _hmac(("AWS4" + secret).encode(), date)
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def _canonical_query(pairs: list[tuple[str, str]]) -> str:
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


@dataclass
class S3State:
    buckets: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # why each refused request was refused
    puts: list[str] = field(default_factory=list)  # keys written through pre-signed URLs


class _Handler(BaseHTTPRequestHandler):
    state: S3State

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _refuse(self, code: int, why: str) -> None:
        self.state.refused.append(f"{self.command} {self.path}: {why}")
        # read the body first, as S3 does: a client still sending it would see a reset
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        code_name = "AccessDenied" if code == 403 else "NoSuchKey"
        body = f"<Error><Code>{code_name}</Code><Message>{why}</Message></Error>"
        self.send_response(code)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def _check(self) -> str | None:
        """Why the request's signature is not valid, or None."""
        parts = urlsplit(self.path)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = dict(pairs)
        if "X-Amz-Signature" in query:  # pre-signed
            credential = query.get("X-Amz-Credential", "")
            signed_headers = query.get("X-Amz-SignedHeaders", "")
            amz_date = query.get("X-Amz-Date", "")
            given = query["X-Amz-Signature"]
            payload = "UNSIGNED-PAYLOAD"
            pairs = [(k, v) for k, v in pairs if k != "X-Amz-Signature"]
            try:
                signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
                    tzinfo=datetime.UTC
                )
                expires = int(query.get("X-Amz-Expires", "0"))
            except ValueError:
                return "bad X-Amz-Date or X-Amz-Expires"
            if datetime.datetime.now(datetime.UTC) > signed_at + datetime.timedelta(
                seconds=expires
            ):
                return "the URL expired"
        else:
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("AWS4-HMAC-SHA256 "):
                return "no AWS4-HMAC-SHA256 Authorization"
            fields = dict(
                item.strip().split("=", 1)
                for item in auth.removeprefix("AWS4-HMAC-SHA256 ").split(",")
            )
            credential = fields.get("Credential", "")
            signed_headers = fields.get("SignedHeaders", "")
            given = fields.get("Signature", "")
            amz_date = self.headers.get("x-amz-date", "")
            payload = self.headers.get("x-amz-content-sha256", "")
        key_id, _, scope = credential.partition("/")
        if key_id != ACCESS_KEY:
            return f"unknown access key {key_id!r}"
        date, region, service, terminal = ([*scope.split("/"), "", "", "", ""])[:4]
        if (region, service, terminal) != (REGION, "s3", "aws4_request"):
            return f"bad credential scope {scope!r}"
        headers = [h for h in signed_headers.split(";") if h]
        if "host" not in headers:
            return "host is not signed"
        canonical_headers = "".join(
            f"{h}:{' '.join((self.headers.get(h) or '').split())}\n" for h in headers
        )
        canonical = "\n".join(
            [
                self.command,
                quote(unquote(parts.path), safe="/-_.~"),
                _canonical_query(pairs),
                canonical_headers,
                signed_headers,
                payload,
            ]
        )
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        if not hmac.compare_digest(_signature(SECRET_KEY, date, region, to_sign), given):
            return "signature does not match"
        return None

    def _object(self) -> tuple[str, str]:
        path = unquote(urlsplit(self.path).path).lstrip("/")
        bucket, _, key = path.partition("/")
        return bucket, key

    def do_PUT(self) -> None:
        why = self._check()
        if why:
            self._refuse(403, why)
            return
        bucket, key = self._object()
        if bucket not in self.state.buckets:
            self._refuse(404, f"no bucket {bucket}")
            return
        length = int(self.headers.get("Content-Length", "0"))
        self.state.buckets[bucket][key] = self.rfile.read(length)
        self.state.puts.append(key)
        self.send_response(200)
        self.send_header(
            "ETag", '"' + hashlib.md5(self.state.buckets[bucket][key]).hexdigest() + '"'
        )
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _get(self, body: bool) -> None:
        why = self._check()
        if why:
            self._refuse(403, why)
            return
        bucket, key = self._object()
        data = self.state.buckets.get(bucket, {}).get(key)
        if data is None:
            if body:
                self._refuse(404, "NoSuchKey")
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", '"' + hashlib.md5(data).hexdigest() + '"')
        self.send_header("Last-Modified", "Mon, 30 Nov 2026 12:00:00 GMT")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._get(body=True)

    def do_DELETE(self) -> None:
        why = self._check()
        if why:
            self._refuse(403, why)
            return
        bucket, key = self._object()
        self.state.buckets.get(bucket, {}).pop(key, None)  # S3: 204 whether it was there
        self.send_response(204)
        self.end_headers()

    def do_HEAD(self) -> None:
        self._get(body=False)


@contextmanager
def s3_server(*buckets: str) -> Iterator[tuple[str, S3State]]:
    """An S3 endpoint on a free loopback port: (its URL, its state)."""
    state = S3State(buckets={b: {} for b in buckets})
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()

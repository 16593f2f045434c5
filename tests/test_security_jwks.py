"""JWKS over https: a real TLS server on loopback with a throw-away CA (trusted through the production setting
``EHR_ALERTS_JWKS_CA_FILE``, not through any test-only switch). Fetched once and cached, re-fetched once on
an unknown kid and then rate-limited, hard timeout, bad answers never crash."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from auth_helpers import TestIssuer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm
from security_testapp import configure, make_app, settings_reset

from service.security import failure_counts
from service.security.jwks import KeySet, parse_jwks

SERVICE = "http://testserver/cds-services/mg-k-patient-view"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server-key.pem)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ehr-alerts test CA"))
        .issuer_name(_name("ehr-alerts test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


class JwksServer:
    """An https server on 127.0.0.1 serving ``self.body`` at /jwks.json; counts requests; can stall."""

    def __init__(self, directory: Path) -> None:
        self.ca, cert, key = make_tls_files(directory)
        self.body: bytes = b'{"keys": []}'
        self.status = 200
        self.stall = 0.0
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if server.stall:
                    time.sleep(server.stall)
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, jwks: dict) -> None:
        self.body = json.dumps(jwks).encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server(tmp_path) -> Iterator[JwksServer]:
    server = JwksServer(tmp_path)
    yield server
    server.close()


@pytest.fixture
def ehr(tmp_path, jwks_server, monkeypatch) -> Iterator[TestIssuer]:
    issuer = TestIssuer(tmp_path)
    jwks_server.serve(issuer.jwks)
    env = {**issuer.env(jwks=jwks_server.url), "EHR_ALERTS_JWKS_CA_FILE": str(jwks_server.ca)}
    with settings_reset():
        configure(monkeypatch, env)
        yield issuer


def test_jwks_fetched_over_https_once_and_cached(ehr, jwks_server):
    with TestClient(make_app()) as http:
        for alg in ("ES384", "RS384", "ES384"):
            assert http.post(SERVICE, headers=ehr.headers(SERVICE, alg=alg)).status_code == 200
    assert jwks_server.requests == 1


def test_unknown_kid_refreshes_once_then_rate_limited(ehr, jwks_server):
    with TestClient(make_app()) as http:
        assert http.post(SERVICE, headers=ehr.headers(SERVICE)).status_code == 200
        assert jwks_server.requests == 1
        ehr.rotate("ES384")  # the issuer rotates its key and publishes the new JWKS
        jwks_server.serve(ehr.jwks)
        assert http.post(SERVICE, headers=ehr.headers(SERVICE)).status_code == 200  # refresh found the new kid
        assert jwks_server.requests == 2
        before = failure_counts().get(("cds", "kid"), 0)
        for _ in range(5):  # forged kids: one refresh would be allowed per minute; none left now
            token = ehr.token(SERVICE, headers={"kid": f"forged-{time.time_ns()}"})
            assert http.post(SERVICE, headers={"Authorization": f"Bearer {token}"}).status_code == 401
        assert jwks_server.requests == 2
        assert failure_counts()[("cds", "kid")] == before + 5


def test_unknown_kid_triggers_exactly_one_fetch(ehr, jwks_server):
    with TestClient(make_app()) as http:
        assert http.post(SERVICE, headers=ehr.headers(SERVICE)).status_code == 200
        forged = ehr.token(SERVICE, headers={"kid": "forged"})
        assert http.post(SERVICE, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
        assert jwks_server.requests == 2  # the refresh was tried once
        assert http.post(SERVICE, headers={"Authorization": f"Bearer {forged}"}).status_code == 401
        assert jwks_server.requests == 2


def test_untrusted_certificate_is_refused(tmp_path, jwks_server, monkeypatch):
    """Without the CA setting the self-signed server is not trusted: 401, never a 500."""
    issuer = TestIssuer(tmp_path)
    jwks_server.serve(issuer.jwks)
    with settings_reset():
        configure(monkeypatch, issuer.env(jwks=jwks_server.url))
        before = failure_counts().get(("cds", "jwks-unavailable"), 0)
        with TestClient(make_app()) as http:
            assert http.post(SERVICE, headers=issuer.headers(SERVICE)).status_code == 401
        assert failure_counts()[("cds", "jwks-unavailable")] == before + 1
    assert jwks_server.requests == 0  # the TLS handshake failed before any request


@pytest.mark.parametrize(("status", "body"), [(500, b"oops"), (200, b"<html>"), (200, b'{"keys": "x"}')])
def test_bad_jwks_answers_give_401(ehr, jwks_server, status, body):
    jwks_server.status, jwks_server.body = status, body
    with TestClient(make_app()) as http:
        assert http.post(SERVICE, headers=ehr.headers(SERVICE)).status_code == 401
        assert http.post(SERVICE, headers=ehr.headers(SERVICE)).status_code == 401
    assert jwks_server.requests == 1  # a failing source is retried at most once per jwks_min_refresh_seconds


def test_stalled_jwks_server_hits_the_hard_timeout(ehr, jwks_server, monkeypatch):
    env = {**ehr.env(jwks=jwks_server.url), "EHR_ALERTS_JWKS_CA_FILE": str(jwks_server.ca)}
    configure(monkeypatch, {**env, "EHR_ALERTS_JWKS_TIMEOUT_SECONDS": "0.5"})
    jwks_server.stall = 3
    before = failure_counts().get(("cds", "jwks-unavailable"), 0)
    with TestClient(make_app()) as http:
        assert http.post(SERVICE, headers=ehr.headers(SERVICE)).status_code == 401
    assert failure_counts()[("cds", "jwks-unavailable")] == before + 1


def test_keyset_refetches_when_older_than_max_age(jwks_server, tmp_path, monkeypatch):
    issuer = TestIssuer(tmp_path)
    jwks_server.serve(issuer.jwks)
    keys = KeySet(jwks_server.url, timeout=5, min_refresh=60, max_age=3600, ca_file=jwks_server.ca)
    assert asyncio.run(keys.key(issuer.kid())) is not None
    assert asyncio.run(keys.key(issuer.kid())) is not None
    assert jwks_server.requests == 1
    later = time.monotonic() + 3601
    monkeypatch.setattr("service.security.jwks.time.monotonic", lambda: later)
    assert asyncio.run(keys.key(issuer.kid())) is not None
    assert jwks_server.requests == 2


def test_broken_or_deleted_jwks_file_keeps_the_cached_keys(tmp_path, monkeypatch):
    issuer = TestIssuer(tmp_path)
    with settings_reset():
        configure(monkeypatch, issuer.env())
        with TestClient(make_app()) as http:
            assert http.post(SERVICE, headers=issuer.headers(SERVICE)).status_code == 200
            issuer.jwks_path.write_text("{half a file")
            assert http.post(SERVICE, headers=issuer.headers(SERVICE)).status_code == 200
            issuer.jwks_path.unlink()
            assert http.post(SERVICE, headers=issuer.headers(SERVICE)).status_code == 200
            issuer.rotate("ES384")
            issuer.write_jwks()  # a good file again: re-read at once
            assert http.post(SERVICE, headers=issuer.headers(SERVICE)).status_code == 200


def test_parse_jwks_keeps_only_asymmetric_signing_keys():
    ec_key = ec.generate_private_key(ec.SECP384R1())
    public = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    private = ECAlgorithm.to_jwk(ec_key, as_dict=True)
    jwks = {
        "keys": [
            {**public, "kid": "ok", "use": "sig", "alg": "ES384"},
            {**public, "kid": "enc", "use": "enc"},
            {**public},  # no kid
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {**private, "kid": "private-by-mistake"},
            {"kty": "EC", "kid": "junk", "crv": "P-384", "x": "AA", "y": "AA"},
            "not an object",
        ]
    }
    keys = parse_jwks(jwks, "test")
    assert set(keys) == {"ok", "private-by-mistake"}
    assert isinstance(keys["private-by-mistake"].public_key, ec.EllipticCurvePublicKey)
    assert keys["ok"].fits("ES384") and not keys["ok"].fits("ES256") and not keys["ok"].fits("RS384")
    assert keys["private-by-mistake"].fits("ES384")

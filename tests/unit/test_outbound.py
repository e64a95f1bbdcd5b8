"""The guarded client's address rules and the Standard Webhooks signature, without any network:
every URL here is an IP literal, checked and never connected to."""

from __future__ import annotations

import ipaddress
import time

import pytest
from standardwebhooks import Webhook

from core.outbound import Refused, check_url, why_not_public
from core.settings import Settings
from core.webhooks import new_secret, sign


@pytest.mark.parametrize(("address", "category"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "carrier-grade NAT"), ("224.0.0.1", "multicast"),
    ("233.1.1.1", "multicast"), ("240.0.0.1", "reserved"), ("0.0.0.0", "unspecified"), ("::1", "loopback"),
    ("::ffff:8.8.8.8", "IPv4-mapped"), ("fd00::1", "unique local"), ("fe80::1", "link-local"),
    ("2002:a00:1::1", "6to4"), ("::", "unspecified"),
])
def test_non_public_addresses_are_named(address: str, category: str) -> None:
    assert category in (why_not_public(ipaddress.ip_address(address)) or "")


def test_public_addresses_pass() -> None:
    assert why_not_public(ipaddress.ip_address("8.8.8.8")) is None
    assert why_not_public(ipaddress.ip_address("2606:4700::1111")) is None


def test_allow_list_and_scheme_rules() -> None:
    dev = Settings(outbound_allow="127.0.0.1/32")
    assert check_url("http://127.0.0.1:8080/hook", dev).host == "127.0.0.1"
    with pytest.raises(Refused, match=r"127\.0\.0\.2 .*loopback") as refused:
        check_url("http://127.0.0.2:8080/hook", dev, "webhook")
    assert refused.value.errors[0].field == "webhook"
    prod = Settings(environment="production", s3_secret_key="real", session_secret="s" * 32,
                    outbound_allow="127.0.0.1/32")
    check_url("http://127.0.0.1/hook", prod)  # allow-listed: plain http is fine
    check_url("https://8.8.8.8/hook", prod)
    with pytest.raises(Refused, match="https"):
        check_url("http://8.8.8.8/hook", prod)
    for bad in ("ftp://8.8.8.8/", "https://user:pw@8.8.8.8/", "not a url", "https:///nohost"):
        with pytest.raises(Refused):
            check_url(bad, prod)


def test_signatures_verify_with_the_standardwebhooks_library() -> None:
    old, new = new_secret(), new_secret()
    body, now = b'{"type":"job.succeeded"}', int(time.time())
    header = f"{sign(new, 'msg_1', now, body)} {sign(old, 'msg_1', now, body)}"
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": header}
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)

"""What every adapter shares (retention_adapters.common): identity, signatures and
reading payloads, each refusal one clear reason."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from retention_adapters import common
from retention_adapters.common import BodyError, SignatureError


def test_a_customer_is_the_lower_cased_address_else_the_platform_id():
    assert common.customer("shopify", " Ann@Example.COM ", 7) == "email:ann@example.com"
    assert common.customer("shopify", None, 7) == "shopify:7"
    assert common.customer("shopify", "not an address", "7") == "shopify:7"
    with pytest.raises(BodyError, match=r"names no customer"):
        common.customer("shopify", "", None)


@pytest.mark.parametrize("value", ["a@b@c", "ann@x.com\r\nBcc: eve@x.com", "<a@x.com>",
                                   "a b@x.com", "a@x.com, b@y.com", 12, "x" * 251 + "@y.z",
                                   "\u212aim@example.com", "a\x00b@x.com", "a/b@x.com",
                                   "a:b@x.com", "a%2f@x.com", "a?b@x.com", "ann@localhost"])
def test_what_is_not_one_address_is_no_address(value):
    assert common.email_of(value) is None


@pytest.mark.parametrize("value", [True, 1.5, "", " ", "a b", "a\nb", "x" * 201, ["1"], "..",
                                   "1/../2", "7?x=1", "\u0661\u0662", "a%2F"])
def test_an_unusable_platform_id_is_refused(value):
    with pytest.raises(BodyError, match=r"customer id"):
        common.alias("zendesk", value)


def test_identify_links_the_platform_id_to_the_address_when_both_are_there():
    assert common.identify("hubspot", "Bo@X.org", 678) == [
        {"type": "identify", "customer": "email:bo@x.org", "aliases": ["hubspot:678"],
         "move_aliases": False}]
    assert common.identify("hubspot", None, 678) == []
    assert common.identify("hubspot", "bo@x.org", None) == []


def test_hmac_base64_is_the_base64_of_the_digest():
    expected = base64.b64encode(hmac.new(b"k", b"body", hashlib.sha1).digest()).decode()
    assert common.hmac_base64(b"k", b"body", "sha1") == expected


def test_same_compares_and_says_what_is_missing_or_wrong():
    common.same("abc", " abc ", "X-Sig header")
    with pytest.raises(SignatureError, match=r"^no X-Sig header$"):
        common.same("abc", None, "X-Sig header")
    with pytest.raises(SignatureError, match=r"^wrong X-Sig header$"):
        common.same("abc", "abd", "X-Sig header")


@pytest.mark.parametrize(("stamp", "millis", "ok"), [
    ("1000000", False, True), ("1000299", False, True), ("1000301", False, False),
    ("999699", False, False), ("1000000000", True, True), ("1000400000", True, False),
    ("", False, False), ("1e6", False, False), ("-1000000", False, False),
    ("\u00b2", False, False), ("\u0661\u0660\u0660\u0660\u0660\u0660\u0660", False, False),
    ("9" * 17, False, False)])
def test_a_signed_timestamp_more_than_five_minutes_away_is_refused(stamp, millis, ok):
    if ok:
        assert common.signed_recently(stamp, 1_000_000.0, "timestamp", millis=millis) > 0
    else:
        with pytest.raises(SignatureError):
            common.signed_recently(stamp, 1_000_000.0, "timestamp", millis=millis)


def test_field_walks_a_path_and_names_it_when_it_is_missing_or_of_another_type():
    payload = {"order": {"lines": [{"sku": "A"}], "total": "12.50", "paid": True}}
    assert common.field(payload, "order", "lines", 0, "sku", platform="p", kind=str) == "A"
    assert common.field(payload, "order", "gone", platform="p", required=False) is None
    with pytest.raises(BodyError, match=r"^p: the payload has no order.lines.3$"):
        common.field(payload, "order", "lines", 3, platform="p")
    with pytest.raises(BodyError, match=r"^p: order.total is str, not a number$"):
        common.field(payload, "order", "total", platform="p", kind=(int, float))
    with pytest.raises(BodyError, match=r"order.paid is bool"):
        common.field(payload, "order", "paid", platform="p", kind=int)


def test_amounts_and_times_as_platforms_send_them():
    assert common.amount("12.50", "p", "total") == 12.5
    for bad in ("nan", "inf", True, None, "twelve"):
        with pytest.raises(BodyError, match=r"total"):
            common.amount(bad, "p", "total")
    assert common.instant("2026-03-01T10:00:00-05:00", "p", "at") == "2026-03-01T10:00:00-05:00"
    assert common.instant("2026-03-01T15:00:00Z", "p", "at") == "2026-03-01T15:00:00+00:00"
    assert common.instant(1772377200, "p", "at") == "2026-03-01T15:00:00.000+00:00"
    with pytest.raises(BodyError, match=r"no time zone"):
        common.instant("2026-03-01T10:00:00", "p", "at")
    with pytest.raises(BodyError, match=r"not a time"):
        common.instant(float("nan"), "p", "at")


def test_body_object_names_the_platform():
    assert common.body_object(b'{"a": 1}', "shopify") == {"a": 1}
    with pytest.raises(BodyError, match=r"^shopify: invalid JSON"):
        common.body_object(b"{", "shopify")

"""Webhook signing, verification and one delivery attempt (docs/monitoring.md#webhooks).

Every request carries

- ``X-Modelfleet-Timestamp``: Unix seconds when this attempt was sent;
- ``X-Modelfleet-Signature``: ``sha256=`` + hex HMAC-SHA256 with the webhook's secret over
  ``TIMESTAMP + "." + BODY``: the timestamp is signed too, so a captured request replayed
  later fails a receiver that checks it against its clock (:func:`verify`);
- ``X-Modelfleet-Idempotency-Key``: the same for every retry of one event, also in the body.

The body is fixed when the event is queued, so retries send the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from modelfleet.kernel.errors import InvalidRequestError

SIGNATURE_HEADER = "X-Modelfleet-Signature"
TIMESTAMP_HEADER = "X-Modelfleet-Timestamp"
KEY_HEADER = "X-Modelfleet-Idempotency-Key"
EVENT_HEADER = "X-Modelfleet-Event"
# A receiver refuses requests signed longer ago than this (replays), or this far in the future.
DEFAULT_TOLERANCE_S = 300.0
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")


def check_webhook(name: str, url: str, secret: bytes) -> None:
    if not _NAME.match(name):
        raise InvalidRequestError(
            f"invalid webhook name {name!r}: use 1-63 of a-z 0-9 . _ - (starting with a letter "
            "or digit)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(
            f"invalid webhook URL {url!r}: use http://HOST[:PORT]/PATH or https://..."
        )
    if parts.username or parts.password:
        raise InvalidRequestError(
            "webhook URLs may not carry credentials (they would be shown by `webhooks ls`); "
            "the receiver authenticates the hub by the signature"
        )
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise InvalidRequestError(
            f"the webhook secret is {len(secret)} bytes; use {MIN_SECRET_BYTES} to "
            f"{MAX_SECRET_BYTES} (e.g. `openssl rand -hex 32 > secret`)"
        )


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: bytes,
    body: bytes,
    headers: Mapping[str, str],
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> bool:
    """What a receiver does: the signature matches this body and timestamp, and the timestamp
    is within ``tolerance_s`` of ``now``. Header names are matched case-insensitively."""
    lower = {k.lower(): v for k, v in headers.items()}
    ts_text = lower.get(TIMESTAMP_HEADER.lower(), "")
    given = lower.get(SIGNATURE_HEADER.lower(), "")
    if not ts_text.isdigit() or not given:
        return False
    ts = int(ts_text)
    if abs(now - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), given)


def backoff(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry ``attempt`` + 1: exponential, capped, with jitter (half to all of
    it) so receivers that come back are not hit by every queued event at once."""
    delay = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    jitter: float = (rng or random).random()
    return delay * (0.5 + 0.5 * jitter)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a 301/302/303 as a GET without the body: a receiver that moved is
    an error for the operator to fix (the 3xx shows in `webhooks ls`), not a silent drop."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


@dataclass(frozen=True)
class Outcome:
    ok: bool
    # HTTP status (0: no response), and a short reason for `webhooks ls` and the log.
    status: int
    error: str


def post(
    url: str, secret: bytes, body: bytes, key: str, timestamp: int, timeout_s: float
) -> Outcome:
    """One attempt; any 2xx is delivered. Blocking (run it off the event loop)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "modelfleet-hub",
        EVENT_HEADER: "alert",
        KEY_HEADER: key,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(req, timeout=timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        return Outcome(False, exc.code, f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Outcome(False, 0, f"not delivered: {reason}")
    if 200 <= status < 300:
        return Outcome(True, status, "")
    return Outcome(False, status, f"HTTP {status}")


__all__ = [
    "EVENT_HEADER",
    "KEY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Outcome",
    "backoff",
    "check_webhook",
    "post",
    "sign",
    "verify",
]

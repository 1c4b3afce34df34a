"""AWS Signature Version 4 for the stack's object store: its credentials, and checking a request's signature.

The credentials derive from the stack's access token, so whoever holds the
connection string can compute them and nobody has to hand out a second secret:

    access key id      metaflow-stack
    secret access key  hex(HMAC-SHA256(key=token, msg="s3"))

Rotating the token therefore rotates the S3 credentials. The stack's own
processes (the UI backend) use a second pair whose secret sits in a 0600 file
and does not change with the token, so a rotation does not cut the UI off
from the artifacts it shows.

`verify()` checks one request as received: header authentication
(`Authorization: AWS4-HMAC-SHA256 ...`) or a presigned URL (`X-Amz-*` query
parameters), the clock (15 minutes either way) and a presigned URL's expiry.
It does not read the body: the payload hash named in `x-amz-content-sha256` is
covered by the signature and returned, and the object store checks the body
against it before it writes anything (see installer/objectstore.py).

Standard library only: the remote side (`connect`) imports it too.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

__all__ = [
    "ACCESS_KEY_ID", "ALGORITHM", "INTERNAL_ACCESS_KEY_ID", "MAX_SKEW_S", "REGION", "CredentialSource", "Credentials",
    "S3AuthError",
    "Verified", "canonical_query", "credentials_for_token", "secret_for_token", "sign_headers", "verify",
]

ALGORITHM = "AWS4-HMAC-SHA256"
ACCESS_KEY_ID = "metaflow-stack"
INTERNAL_ACCESS_KEY_ID = "metaflow-stack-internal"
REGION = "us-east-1"
SERVICE = "s3"
MAX_SKEW_S = 15 * 60
MAX_PRESIGN_S = 7 * 24 * 3600
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_DERIVATION = b"s3"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_AMZ_DATE = re.compile(r"^(\d{8})T\d{6}Z$")
_UNRESERVED = "-_.~"


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str = ""

    def __repr__(self) -> str:  # the secret never shows in a log or a traceback
        return f"Credentials(access_key_id={self.access_key_id!r})"


def secret_for_token(token: str) -> str:
    """The S3 secret access key that goes with the stack's access token."""
    return hmac.new(token.encode(), _DERIVATION, hashlib.sha256).hexdigest()


def credentials_for_token(token: str) -> Credentials:
    return Credentials(ACCESS_KEY_ID, secret_for_token(token))


class S3AuthError(Exception):
    """A refused request, in S3's own terms (status, error code, message)."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Verified:
    access_key_id: str
    payload_hash: str   # a sha256 hex digest, UNSIGNED-PAYLOAD or STREAMING-UNSIGNED-PAYLOAD-TRAILER
    presigned: bool


Lookup = Callable[[str], "str | None"]   # access key id -> secret, None if unknown


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str = SERVICE) -> bytes:
    key = _hmac(("AWS4" + secret).encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def _encode(text: str) -> str:
    return quote(text, safe=_UNRESERVED)


def canonical_query(raw_query: str, *, drop: Iterable[str] = ()) -> str:
    """The canonical query string: each name and value decoded, re-encoded (RFC 3986), sorted."""
    skip = set(drop)
    pairs = []
    for item in raw_query.split("&") if raw_query else ():
        if not item:
            continue
        name, _, value = item.partition("=")
        name, value = unquote(name), unquote(value)
        if name in skip:
            continue
        pairs.append((_encode(name), _encode(value)))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _canonical_uris(raw_path: str) -> list[str]:
    # S3 signs the path as the client encoded it (no normalisation); clients that left some
    # characters unencoded sign the RFC 3986 form, so that one is tried too.
    uris = [raw_path or "/"]
    encoded = quote(unquote(raw_path or "/"), safe="/~")
    if encoded not in uris:
        uris.append(encoded)
    return uris


def _header_values(headers: Mapping[str, str] | object, name: str) -> list[str]:
    getall = getattr(headers, "getall", None) or getattr(headers, "get_all", None)  # multidict, email.message
    if getall is not None:
        return list(getall(name, None) or [])
    value = headers.get(name)  # type: ignore[attr-defined]
    return [] if value is None else [value]


def _canonical_headers(headers: object, signed: list[str]) -> str:
    lines = []
    for name in signed:
        values = _header_values(headers, name)
        if not values:
            raise S3AuthError("AccessDenied", f"the signed header {name!r} is missing from the request")
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    return "".join(lines)


def _parse_timestamp(amz_date: str) -> float:
    try:
        if _AMZ_DATE.match(amz_date):
            return float(calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ")))
    except (ValueError, OverflowError):
        pass  # month 13, second 99, year 0: not a date
    raise S3AuthError("AccessDenied", "X-Amz-Date must be a date like 20240131T235959Z")


def _parse_scope(credential: str) -> tuple[str, str, str]:
    """(access key id, date, region) from 'AKID/20240131/us-east-1/s3/aws4_request'."""
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not parts[0]:
        raise S3AuthError("AuthorizationHeaderMalformed", "the credential must be "
                          "<access key>/<yyyymmdd>/<region>/s3/aws4_request")
    if parts[3] != SERVICE:
        raise S3AuthError("AuthorizationHeaderMalformed", f"the credential names service {parts[3]!r}, not 's3'")
    return parts[0], parts[1], parts[2]


def _parse_authorization(value: str) -> dict[str, str]:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise S3AuthError("AccessDenied", f"only {ALGORITHM} signatures are accepted")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, item = part.strip().partition("=")
        if sep:
            fields[name] = item
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if name not in fields]
    if missing:
        raise S3AuthError("AuthorizationHeaderMalformed", f"the Authorization header lacks {', '.join(missing)}")
    return fields


def verify(method: str, raw_path: str, raw_query: str, headers: object, lookup: Lookup, *,
           now: float | None = None, max_skew: float = MAX_SKEW_S) -> Verified:
    """Check the SigV4 signature of a request as received; raise S3AuthError to refuse it.

    `raw_path` and `raw_query` are the request target exactly as sent (percent-encoding kept),
    `headers` a case-insensitive mapping (getall() honoured when present). Total: whatever bytes a
    request holds, the outcome is a Verified or an S3AuthError, never another exception.
    """
    try:
        return _verify(method, raw_path, raw_query, headers, lookup, time.time() if now is None else now,
                       max_skew)
    except S3AuthError:
        raise
    except (ValueError, UnicodeError, OverflowError, LookupError, TypeError):
        raise S3AuthError("AccessDenied", "the request's signature fields could not be read") from None


def _verify(method: str, raw_path: str, raw_query: str, headers: object, lookup: Lookup, now: float,
            max_skew: float) -> Verified:
    query = {}
    for item in raw_query.split("&") if raw_query else ():
        name, _, value = item.partition("=")
        query.setdefault(unquote(name), unquote(value))
    authorization = _header_values(headers, "authorization")
    if authorization and "X-Amz-Signature" in query:
        raise S3AuthError("InvalidArgument", "a request cannot carry both an Authorization header and "
                          "a presigned signature", status=400)
    if authorization:
        return _verify_header(method, raw_path, raw_query, headers, authorization[0], lookup, now, max_skew)
    if "X-Amz-Signature" in query or "X-Amz-Credential" in query:
        return _verify_presigned(method, raw_path, raw_query, query, headers, lookup, now, max_skew)
    if "Signature" in query or "AWSAccessKeyId" in query:
        raise S3AuthError("AccessDenied", "signature version 2 is not accepted; sign with AWS4-HMAC-SHA256")
    raise S3AuthError("AccessDenied", "Access Denied: the request is not signed")


def _check_signature(method: str, raw_path: str, canonical_q: str, headers: object, signed: list[str],
                     payload: str, amz_date: str, scope_date: str, region: str, secret: str,
                     signature: str) -> None:
    scope = f"{scope_date}/{region}/{SERVICE}/aws4_request"
    key = signing_key(secret, scope_date, region)
    canonical_h = _canonical_headers(headers, signed)
    for uri in _canonical_uris(raw_path):
        request = "\n".join([method.upper(), uri, canonical_q, canonical_h, ";".join(signed), payload])
        to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, signature.lower()):
            return
    raise S3AuthError("SignatureDoesNotMatch", "The request signature we calculated does not match the "
                      "signature you provided. Check your key and signing method.")


def _signed_list(text: str, headers: object) -> list[str]:
    signed = [name.strip().lower() for name in text.split(";") if name.strip()]
    if signed != sorted(set(signed)):
        raise S3AuthError("AuthorizationHeaderMalformed", "SignedHeaders must be sorted, lower case, unique")
    if "host" not in signed:
        raise S3AuthError("AccessDenied", "the host header must be signed")
    return signed


def _require_signed_amz_headers(headers: object, signed: list[str]) -> None:
    # An unsigned x-amz-* header could change what a replayed request does (x-amz-copy-source turns
    # a PutObject into a CopyObject), so every one present must be covered by the signature.
    names = headers.keys() if hasattr(headers, "keys") else ()  # type: ignore[union-attr]
    unsigned = sorted({n.lower() for n in names if n.lower().startswith("x-amz-")} - set(signed))
    if unsigned:
        raise S3AuthError("AccessDenied", f"headers present but not signed: {', '.join(unsigned)}")


def _secret(lookup: Lookup, access_key: str) -> str:
    secret = lookup(access_key)
    if not secret:
        raise S3AuthError("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
    return secret


def _verify_header(method: str, raw_path: str, raw_query: str, headers: object, authorization: str,
                   lookup: Lookup, now: float, max_skew: float) -> Verified:
    fields = _parse_authorization(authorization)
    access_key, scope_date, region = _parse_scope(fields["Credential"])
    signed = _signed_list(fields["SignedHeaders"], headers)
    _require_signed_amz_headers(headers, signed)
    dates = _header_values(headers, "x-amz-date")
    if not dates:
        raise S3AuthError("AccessDenied", "header-signed requests must carry X-Amz-Date")
    amz_date = dates[0].strip()
    when = _parse_timestamp(amz_date)
    if amz_date[:8] != scope_date:
        raise S3AuthError("SignatureDoesNotMatch", "the credential's date differs from X-Amz-Date")
    if abs(now - when) > max_skew:
        raise S3AuthError("RequestTimeTooSkewed", "The difference between the request time and the "
                          "server's time is too large.")
    payloads = _header_values(headers, "x-amz-content-sha256")
    if not payloads:
        raise S3AuthError("InvalidRequest", "missing required header x-amz-content-sha256", status=400)
    payload = payloads[0].strip()
    if payload.startswith("STREAMING-") and payload != STREAMING_UNSIGNED_TRAILER:
        # Chunk signatures would have to be checked chunk by chunk as the body streams through.
        raise S3AuthError("NotImplemented", f"x-amz-content-sha256: {payload} is not supported; send "
                          "UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER or the body's sha256", status=501)
    if payload != UNSIGNED_PAYLOAD and payload != STREAMING_UNSIGNED_TRAILER and not _HEX64.match(payload):
        raise S3AuthError("InvalidArgument", "x-amz-content-sha256 must be a lower-case sha256 hex digest",
                          status=400)
    secret = _secret(lookup, access_key)
    _check_signature(method, raw_path, canonical_query(raw_query), headers, signed, payload, amz_date,
                     scope_date, region, secret, fields["Signature"])
    return Verified(access_key, payload, presigned=False)


def _verify_presigned(method: str, raw_path: str, raw_query: str, query: Mapping[str, str], headers: object,
                      lookup: Lookup, now: float, max_skew: float) -> Verified:
    needed = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
              "X-Amz-Signature")
    missing = [name for name in needed if not query.get(name)]
    if missing:
        raise S3AuthError("AuthorizationQueryParametersError", f"presigned URL lacks {', '.join(missing)}",
                          status=400)
    if query["X-Amz-Algorithm"] != ALGORITHM:
        raise S3AuthError("AuthorizationQueryParametersError", f"only {ALGORITHM} is accepted", status=400)
    access_key, scope_date, region = _parse_scope(query["X-Amz-Credential"])
    amz_date = query["X-Amz-Date"]
    when = _parse_timestamp(amz_date)
    if amz_date[:8] != scope_date:
        raise S3AuthError("SignatureDoesNotMatch", "the credential's date differs from X-Amz-Date")
    try:
        expires = int(query["X-Amz-Expires"])
    except ValueError:
        raise S3AuthError("AuthorizationQueryParametersError", "X-Amz-Expires must be a number of seconds",
                          status=400) from None
    if not 1 <= expires <= MAX_PRESIGN_S:
        raise S3AuthError("AuthorizationQueryParametersError",
                          f"X-Amz-Expires must be between 1 and {MAX_PRESIGN_S} seconds", status=400)
    if when - now > max_skew:
        raise S3AuthError("AccessDenied", "the presigned URL is dated in the future")
    if now > when + expires:
        raise S3AuthError("AccessDenied", "Request has expired")
    signed = _signed_list(query["X-Amz-SignedHeaders"], headers)
    _require_signed_amz_headers(headers, signed)
    payload = query.get("X-Amz-Content-Sha256") or UNSIGNED_PAYLOAD
    if payload != UNSIGNED_PAYLOAD and not _HEX64.match(payload):
        raise S3AuthError("AuthorizationQueryParametersError", "X-Amz-Content-Sha256 must be UNSIGNED-PAYLOAD "
                          "or a sha256 hex digest", status=400)
    secret = _secret(lookup, access_key)
    _check_signature(method, raw_path, canonical_query(raw_query, drop=("X-Amz-Signature",)), headers, signed,
                     payload, amz_date, scope_date, region, secret, query["X-Amz-Signature"])
    return Verified(access_key, payload, presigned=True)


def sign_headers(method: str, url_path: str, raw_query: str, host: str, credentials: Credentials, *,
                 payload_hash: str = EMPTY_SHA256, extra: Mapping[str, str] | None = None,
                 region: str = REGION, now: float | None = None) -> dict[str, str]:
    """Headers that authenticate a request (for `connect`'s probe, which does not need boto3).

    `url_path` must already be percent-encoded as it will be sent.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    headers = {"host": host, "x-amz-date": stamp, "x-amz-content-sha256": payload_hash,
               **{k.lower(): v for k, v in (extra or {}).items()}}
    signed = sorted(headers)
    canonical_h = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed)
    request = "\n".join([method.upper(), url_path or "/", canonical_query(raw_query), canonical_h,
                         ";".join(signed), payload_hash])
    scope = f"{stamp[:8]}/{region}/{SERVICE}/aws4_request"
    to_sign = "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(request.encode()).hexdigest()])
    signature = hmac.new(signing_key(credentials.secret_access_key, stamp[:8], region), to_sign.encode(),
                         hashlib.sha256).hexdigest()
    out = {k: v for k, v in headers.items() if k != "host"}
    out["Authorization"] = (f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
                            f"SignedHeaders={';'.join(signed)}, Signature={signature}")
    return out


class CredentialSource:
    """Access key id -> secret for the stack: the pair derived from the token file, and the internal pair.

    Both files are re-read when they change (one stat per lookup), so a rotated token takes
    effect on the next request, without a restart. A missing or unusable file denies its pair.
    """

    def __init__(self, token_file: Path | None, internal_secret_file: Path | None = None) -> None:
        self._files = {ACCESS_KEY_ID: token_file, INTERNAL_ACCESS_KEY_ID: internal_secret_file}
        self._cache: dict[str, tuple[tuple[int, int, int], str]] = {}

    def __call__(self, access_key_id: str) -> str | None:
        path = self._files.get(access_key_id)
        if path is None:
            return None
        try:
            info = os.stat(path)
        except OSError:
            self._cache.pop(access_key_id, None)
            return None
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        cached = self._cache.get(access_key_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        from .errors import StackError
        from .secrets import read_secret

        try:
            value = read_secret(Path(path))
        except StackError:
            self._cache.pop(access_key_id, None)
            return None
        secret = secret_for_token(value) if access_key_id == ACCESS_KEY_ID else value
        self._cache[access_key_id] = (stamp, secret)
        return secret

"""The object store behind the proxy's /s3 route: access control, integrity, persistence, connect.

Everything is real: `python -m installer.objectstore` (LocalBucket) on its unix socket,
`python -m installer.proxy` in front of it, boto3 and requests as clients.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import botocore
import pytest
import requests
from botocore.exceptions import ClientError

from installer import s3auth
from installer.clientconfig import NoObjectStore, ObjectStoreDown, check_object_store
from installer.clientconfig import connect as connect_stack
from installer.connection import format_connection
from installer.objectstore import BUCKET, empty_marker, socket_path, store_answers
from installer.s3auth import Credentials, S3AuthError, credentials_for_token, sign_headers
from installer.secrets import rotate_secret

from .helpers_proxy import REPO, free_port
from .helpers_s3 import S3Stack, s3_client, start_s3_stack, start_store

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Stack]:
    stack = start_s3_stack(tmp_path_factory.mktemp("s3shared"))
    yield stack
    stack.stop()


@pytest.fixture
def own(tmp_path: Path) -> Iterator[S3Stack]:
    """A stack of the test's own, for tests that rotate the token or restart the store."""
    stack = start_s3_stack(tmp_path / "stack")
    yield stack
    stack.stop()


def _good(stack: S3Stack, **config: object):
    return s3_client(stack.endpoint, stack.credentials(), **config)


def _code(call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(ClientError) as caught:
        call()
    meta = caught.value.response
    return meta["ResponseMetadata"]["HTTPStatusCode"], meta["Error"]["Code"]


def _stored(stack: S3Stack, key: str) -> Path:
    return stack.store.data_dir / BUCKET / key


def signed(stack: S3Stack, method: str, path: str, *, query: str = "", body: bytes = b"",
           headers: dict[str, str] | None = None, payload: str | None = None,
           credentials: Credentials | None = None, now: float | None = None) -> requests.Response:
    """A request signed by our own signer (independent of boto3), sent with requests."""
    host = f"127.0.0.1:{stack.proxy.port}"
    extra = {k.lower(): v for k, v in (headers or {}).items()}
    signed_extra = {k: v for k, v in extra.items() if k.startswith("x-amz-") or k == "content-encoding"}
    auth = sign_headers(method, path, query, host, credentials or stack.credentials(),
                        payload_hash=payload or hashlib.sha256(body).hexdigest(), extra=signed_extra, now=now)
    sent = {**extra, **auth, "Host": host}
    url = f"{stack.url}{path}" + (f"?{query}" if query else "")
    return requests.request(method, url, data=body, headers=sent, timeout=60)


# ---------------------------------------------------------------- every operation refuses bad signatures

def _operations(stack: S3Stack, upload_id: str, etag: str) -> dict[str, Callable[[object], object]]:
    key = "guarded/object.bin"
    return {
        "ListBuckets": lambda c: c.list_buckets(),
        "CreateBucket": lambda c: c.create_bucket(Bucket="intruder-bucket"),
        "HeadBucket": lambda c: c.head_bucket(Bucket=BUCKET),
        "PutObject": lambda c: c.put_object(Bucket=BUCKET, Key=key, Body=b"overwritten"),
        "GetObject": lambda c: c.get_object(Bucket=BUCKET, Key=key)["Body"].read(),
        "GetObjectRange": lambda c: c.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-3")["Body"].read(),
        "HeadObject": lambda c: c.head_object(Bucket=BUCKET, Key=key),
        "ListObjectsV2": lambda c: c.list_objects_v2(Bucket=BUCKET, Prefix="guarded/"),
        "DeleteObject": lambda c: c.delete_object(Bucket=BUCKET, Key=key),
        "CreateMultipartUpload": lambda c: c.create_multipart_upload(Bucket=BUCKET, Key="guarded/multi.bin"),
        "UploadPart": lambda c: c.upload_part(Bucket=BUCKET, Key="guarded/multi.bin", UploadId=upload_id,
                                              PartNumber=2, Body=b"x" * 1024),
        "CompleteMultipartUpload": lambda c: c.complete_multipart_upload(
            Bucket=BUCKET, Key="guarded/multi.bin", UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]}),
    }


@pytest.mark.parametrize("who", ["unsigned", "wrong secret", "unknown key id", "token as key"])
def test_every_operation_refuses_requests_without_the_stacks_signature(shared: S3Stack, who: str) -> None:
    good = _good(shared)
    good.put_object(Bucket=BUCKET, Key="guarded/object.bin", Body=b"original")
    upload = good.create_multipart_upload(Bucket=BUCKET, Key="guarded/multi.bin")["UploadId"]
    etag = good.upload_part(Bucket=BUCKET, Key="guarded/multi.bin", UploadId=upload, PartNumber=1,
                            Body=b"p" * (5 * MiB))["ETag"]
    bad = {
        "unsigned": lambda: s3_client(shared.endpoint, Credentials("x", "y"), signature_version=botocore.UNSIGNED),
        "wrong secret": lambda: s3_client(shared.endpoint, Credentials(s3auth.ACCESS_KEY_ID, "0" * 64)),
        "unknown key id": lambda: s3_client(shared.endpoint, Credentials("AKIAEXAMPLE", shared.credentials()
                                                                         .secret_access_key)),
        "token as key": lambda: s3_client(shared.endpoint, Credentials(s3auth.ACCESS_KEY_ID, shared.token)),
    }[who]()
    expected = {"unsigned": "AccessDenied", "wrong secret": "SignatureDoesNotMatch",
                "unknown key id": "InvalidAccessKeyId", "token as key": "SignatureDoesNotMatch"}[who]
    for name, operation in _operations(shared, upload, etag).items():
        status, code = _code(lambda: operation(bad))
        assert status == 403, (name, status, code)
        if name not in ("HeadBucket", "HeadObject"):  # HEAD answers carry no body, so no code
            assert code == expected, (name, code)
    # Nothing changed: the object, the bucket list and the upload are as the owner left them.
    assert _stored(shared, "guarded/object.bin").read_bytes() == b"original"
    assert not (shared.store.data_dir / "intruder-bucket").exists()
    assert [b["Name"] for b in good.list_buckets()["Buckets"]] == [BUCKET]
    good.complete_multipart_upload(Bucket=BUCKET, Key="guarded/multi.bin", UploadId=upload,
                                   MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    assert _stored(shared, "guarded/multi.bin").read_bytes() == b"p" * (5 * MiB)


def test_the_signed_operations_all_work(shared: S3Stack) -> None:
    client = _good(shared)
    assert client.head_bucket(Bucket=BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200
    client.create_bucket(Bucket="second-bucket")
    odd = "odd keys/ü space+plus~tilde*(paren)'q'!&=.txt"
    client.put_object(Bucket=BUCKET, Key=odd, Body=b"0123456789")
    assert client.get_object(Bucket=BUCKET, Key=odd)["Body"].read() == b"0123456789"
    ranged = client.get_object(Bucket=BUCKET, Key=odd, Range="bytes=3-6")
    assert ranged["Body"].read() == b"3456" and ranged["ContentRange"] == "bytes 3-6/10"
    assert client.head_object(Bucket=BUCKET, Key=odd)["ContentLength"] == 10
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="odd keys/ü space", Delimiter="/")
    assert [o["Key"] for o in listed["Contents"]] == [odd]
    client.delete_object(Bucket=BUCKET, Key=odd)
    assert not _stored(shared, odd).exists()
    assert _code(lambda: client.head_object(Bucket=BUCKET, Key=odd))[0] == 404


def test_tampered_requests_are_refused(shared: S3Stack) -> None:
    client = _good(shared)
    client.put_object(Bucket=BUCKET, Key="tamper/target", Body=b"keep me")

    def redirect_to_other_key(request: botocore.awsrequest.AWSPreparedRequest, **_: object) -> None:
        request.url = request.url.replace("/tamper/target", "/tamper/other")

    client.meta.events.register("before-send.s3.PutObject", redirect_to_other_key)
    assert _code(lambda: client.put_object(Bucket=BUCKET, Key="tamper/target", Body=b"x")) \
        == (403, "SignatureDoesNotMatch")
    assert not _stored(shared, "tamper/other").exists()

    # A header the signature does not cover (an x-amz-copy-source would turn a put into a copy).
    answer = signed(shared, "PUT", "/s3/metaflow/tamper/copy", body=b"x")
    assert answer.status_code == 200
    sneaky = _good(shared)

    def add_copy_source(request: botocore.awsrequest.AWSPreparedRequest, **_: object) -> None:
        request.headers["x-amz-copy-source"] = "/metaflow/tamper/target"

    sneaky.meta.events.register("before-send.s3.PutObject", add_copy_source)
    assert _code(lambda: sneaky.put_object(Bucket=BUCKET, Key="tamper/copy", Body=b"y"))[0] == 403
    assert _stored(shared, "tamper/copy").read_bytes() == b"x"


def test_the_token_alone_is_no_credential_on_the_s3_route(shared: S3Stack) -> None:
    answer = requests.get(f"{shared.endpoint}/metaflow?list-type=2", headers={"x-api-key": shared.token},
                          timeout=10)
    assert answer.status_code == 403
    assert answer.headers["Content-Type"].startswith("application/xml")
    assert "<Code>AccessDenied</Code>" in answer.text


def test_clock_skew_beyond_fifteen_minutes_is_refused(shared: S3Stack) -> None:
    stale = signed(shared, "GET", "/s3/metaflow", query="list-type=2", now=time.time() - 16 * 60)
    assert stale.status_code == 403 and "<Code>RequestTimeTooSkewed</Code>" in stale.text
    future = signed(shared, "GET", "/s3/metaflow", query="list-type=2", now=time.time() + 16 * 60)
    assert future.status_code == 403 and "<Code>RequestTimeTooSkewed</Code>" in future.text
    slightly_off = signed(shared, "GET", "/s3/metaflow", query="list-type=2", now=time.time() - 10 * 60)
    assert slightly_off.status_code == 200


def test_presigned_urls_work_until_they_expire_and_only_untampered(shared: S3Stack) -> None:
    client = _good(shared)
    client.put_object(Bucket=BUCKET, Key="shared/report.txt", Body=b"presigned content")
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "shared/report.txt"},
                                        ExpiresIn=300)
    assert "X-Amz-Signature=" in url
    assert requests.get(url, timeout=10).content == b"presigned content"
    assert requests.get(url, headers={"Range": "bytes=0-8"}, timeout=10).content == b"presigned"

    for tampered in (url.replace("report.txt", "other.txt"), url.replace("X-Amz-Expires=300", "X-Amz-Expires=900"),
                     url[:-1] + ("0" if url[-1] != "0" else "1")):
        answer = requests.get(tampered, timeout=10)
        assert answer.status_code == 403, tampered
        assert "<Code>SignatureDoesNotMatch</Code>" in answer.text

    put_url = client.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": "shared/upload.txt"},
                                            ExpiresIn=300)
    assert requests.put(put_url, data=b"via presigned put", timeout=10).status_code == 200
    assert _stored(shared, "shared/upload.txt").read_bytes() == b"via presigned put"

    short = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "shared/report.txt"},
                                          ExpiresIn=1)
    time.sleep(2.1)
    expired = requests.get(short, timeout=10)
    assert expired.status_code == 403 and "Request has expired" in expired.text

    log = shared.proxy.log_text()
    assert "X-Amz-Signature=REDACTED" in log
    assert url.rsplit("X-Amz-Signature=", 1)[1] not in log


def test_rotating_the_token_rotates_the_s3_credentials_without_a_restart(own: S3Stack) -> None:
    old = _good(own)
    old.put_object(Bucket=BUCKET, Key="before-rotation", Body=b"kept")
    internal = s3_client(own.endpoint, own.internal_credentials())
    proxy_pid, store_pid = own.proxy.pid, own.store.pid

    new_token = rotate_secret(own.proxy.token_file)
    assert own.token == new_token
    assert _code(lambda: old.list_objects_v2(Bucket=BUCKET)) == (403, "SignatureDoesNotMatch")
    assert _code(lambda: old.put_object(Bucket=BUCKET, Key="after-rotation", Body=b"x"))[0] == 403
    new = s3_client(own.endpoint, credentials_for_token(new_token))
    assert new.get_object(Bucket=BUCKET, Key="before-rotation")["Body"].read() == b"kept"
    new.put_object(Bucket=BUCKET, Key="after-rotation", Body=b"new credentials")
    # The stack's own pair (the UI backend's) does not change with the token.
    assert internal.get_object(Bucket=BUCKET, Key="after-rotation")["Body"].read() == b"new credentials"
    assert (own.proxy.pid, own.store.pid) == (proxy_pid, store_pid)


def test_objects_are_plain_files_and_survive_a_store_restart(own: S3Stack) -> None:
    client = _good(own)
    small = b"small object\n"
    large = os.urandom(20 * MiB + 7)
    client.put_object(Bucket=BUCKET, Key="keep/small.txt", Body=small)
    from boto3.s3.transfer import TransferConfig

    client.upload_fileobj(__import__("io").BytesIO(large), BUCKET, "keep/large.bin",
                          Config=TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB))
    assert _stored(own, "keep/small.txt").read_bytes() == small
    assert _stored(own, "keep/large.bin").read_bytes() == large

    old_pid = own.store.pid
    own.restart_store()
    assert own.store.pid != old_pid
    client = _good(own)
    assert client.get_object(Bucket=BUCKET, Key="keep/small.txt")["Body"].read() == small
    assert hashlib.sha256(client.get_object(Bucket=BUCKET, Key="keep/large.bin")["Body"].read()).digest() \
        == hashlib.sha256(large).digest()
    tail = client.get_object(Bucket=BUCKET, Key="keep/large.bin", Range=f"bytes={20 * MiB}-")["Body"].read()
    assert tail == large[20 * MiB:]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="keep/")["Contents"]]
    assert keys == ["keep/large.bin", "keep/small.txt"]


def test_an_object_written_empty_has_a_hidden_marker_that_follows_its_content(shared: S3Stack) -> None:
    """Drive can deliver an object's name without its content: the marker tells an object written
    empty on purpose from one whose content was lost (the restore's check relies on it)."""
    client = _good(shared)
    key = "markers/silent.log"
    client.put_object(Bucket=BUCKET, Key=key, Body=b"")
    stored = _stored(shared, key)
    assert stored.stat().st_size == 0 and empty_marker(stored).exists()
    # A conditional write that is refused changes neither the object nor its marker.
    assert _code(lambda: client.put_object(Bucket=BUCKET, Key=key, Body=b"x", IfNoneMatch="*"))[0] == 412
    assert stored.stat().st_size == 0 and empty_marker(stored).exists()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="markers/")["Contents"]]
    assert keys == [key]
    client.put_object(Bucket=BUCKET, Key=key, Body=b"now it says something\n")
    assert not empty_marker(stored).exists()
    client.put_object(Bucket=BUCKET, Key=key, Body=b"")
    assert empty_marker(stored).exists()
    client.delete_object(Bucket=BUCKET, Key=key)
    assert not stored.exists() and not empty_marker(stored).exists()


def test_an_empty_file_without_its_marker_reads_as_absent_until_written_again(shared: S3Stack) -> None:
    """A torn object (Drive delivered its name, not its content) is absent to every operation, so a
    client that writes only absent objects (Metaflow's content-addressed store) writes it again."""
    client = _good(shared)
    key, content = "torn/0123abcd", b"the content Drive lost"
    client.put_object(Bucket=BUCKET, Key=key, Body=content)
    stored = _stored(shared, key)
    stored.write_bytes(b"")  # what a runtime that died leaves on Google
    assert _code(lambda: client.head_object(Bucket=BUCKET, Key=key))[0] == 404
    assert _code(lambda: client.get_object(Bucket=BUCKET, Key=key))[0] == 404
    assert _code(lambda: client.copy_object(Bucket=BUCKET, Key="torn/copy",
                                            CopySource={"Bucket": BUCKET, "Key": key}))[0] == 404
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix="torn/")
    client.put_object(Bucket=BUCKET, Key=key, Body=content, IfNoneMatch="*")
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == content
    assert [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="torn/")["Contents"]] == [key]
    assert _code(lambda: client.put_object(Bucket=BUCKET, Key=key, Body=b"x", IfNoneMatch="*"))[0] == 412
    client.delete_object(Bucket=BUCKET, Key=key)


def test_health_says_degraded_while_the_store_is_down_and_s3_gets_502(own: S3Stack) -> None:
    assert requests.get(f"{own.url}/healthz", timeout=10).json() == {"status": "ok", "ui": "ready"}
    own.store.stop()
    deadline = time.monotonic() + 10  # the proxy caches its health answer for a second
    while True:
        health = requests.get(f"{own.url}/healthz", timeout=10)
        if health.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert health.status_code == 503 and health.json() == {"status": "degraded", "ui": "ready"}
    assert signed(own, "GET", "/s3/").status_code == 502
    with pytest.raises(ObjectStoreDown):
        check_object_store(own.url, own.token, timeout=10)


# ---------------------------------------------------------------- bodies are checked before anything is written

def test_a_body_that_does_not_match_its_signed_sha256_is_not_stored(shared: S3Stack) -> None:
    client = _good(shared)
    client.put_object(Bucket=BUCKET, Key="integrity/doc", Body=b"good content")

    def swap_body(request: botocore.awsrequest.AWSPreparedRequest, **_: object) -> None:
        request.body = b"evil content"

    client.meta.events.register("before-send.s3.PutObject", swap_body)
    status, code = _code(lambda: client.put_object(Bucket=BUCKET, Key="integrity/doc", Body=b"fine content"))
    assert (status, code) == (400, "XAmzContentSHA256Mismatch")
    assert _stored(shared, "integrity/doc").read_bytes() == b"good content"

    md5 = base64.b64encode(hashlib.md5(b"something else").digest()).decode()
    answer = signed(shared, "PUT", "/s3/metaflow/integrity/doc", body=b"other", headers={"Content-MD5": md5})
    assert answer.status_code == 400 and "<Code>BadDigest</Code>" in answer.text
    assert _stored(shared, "integrity/doc").read_bytes() == b"good content"


def _aws_chunked(data: bytes, trailer: str, chunk: int = 64 * 1024) -> bytes:
    out = bytearray()
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    out += b"0\r\n" + trailer.encode() + b"\r\n\r\n"
    return bytes(out)


def _crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_aws_chunked_uploads_with_a_checksum_trailer(shared: S3Stack) -> None:
    """What boto3 sends over https (through the tunnel): aws-chunked, unsigned payload, CRC32 trailer."""
    data = os.urandom(300 * 1024 + 5)
    headers = {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(data)),
               "x-amz-trailer": "x-amz-checksum-crc32"}
    good = signed(shared, "PUT", "/s3/metaflow/chunked/ok.bin", body=_aws_chunked(data, f"x-amz-checksum-crc32:"
                  f"{_crc32(data)}"), headers=headers, payload=s3auth.STREAMING_UNSIGNED_TRAILER)
    assert good.status_code == 200, good.text
    assert _stored(shared, "chunked/ok.bin").read_bytes() == data

    bad = signed(shared, "PUT", "/s3/metaflow/chunked/bad.bin", body=_aws_chunked(data, "x-amz-checksum-crc32:"
                 f"{_crc32(b'not the data')}"), headers=headers, payload=s3auth.STREAMING_UNSIGNED_TRAILER)
    assert bad.status_code == 400 and "<Code>BadDigest</Code>" in bad.text
    assert not _stored(shared, "chunked/bad.bin").exists()

    signed_chunks = signed(shared, "PUT", "/s3/metaflow/chunked/sig.bin", body=b"0\r\n\r\n",
                           payload="STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    assert signed_chunks.status_code == 501 and "<Code>NotImplemented</Code>" in signed_chunks.text


def test_an_upload_cut_short_is_not_stored(shared: S3Stack) -> None:
    client = _good(shared)
    client.put_object(Bucket=BUCKET, Key="cut/existing", Body=b"E" * 1000)
    host = f"127.0.0.1:{shared.proxy.port}"
    for key in ("cut/new", "cut/existing"):
        auth = sign_headers("PUT", f"/s3/metaflow/{key}", "", host, shared.credentials(),
                            payload_hash=s3auth.UNSIGNED_PAYLOAD)
        head = [f"PUT /s3/metaflow/{key} HTTP/1.1", f"Host: {host}", "Content-Length: 100000",
                *(f"{k}: {v}" for k, v in auth.items())]
        with socket.create_connection(("127.0.0.1", shared.proxy.port), timeout=10) as sock:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b"half" * 5000)
        # Wait until the store has seen the end of that request: a later request is answered after it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "IncompleteBody" not in shared.store.log_text():
        client.list_objects_v2(Bucket=BUCKET, Prefix="cut/")
        time.sleep(0.1)
    assert not _stored(shared, "cut/new").exists()
    assert _stored(shared, "cut/existing").read_bytes() == b"E" * 1000
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="cut/")["Contents"]]
    assert keys == ["cut/existing"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(shared: S3Stack) -> None:
    host = f"127.0.0.1:{shared.proxy.port}"
    auth = sign_headers("PUT", "/s3/metaflow/huge", "", host, shared.credentials(),
                        payload_hash=s3auth.UNSIGNED_PAYLOAD)
    head = ["PUT /s3/metaflow/huge HTTP/1.1", f"Host: {host}", f"Content-Length: {600 * MiB}",
            *(f"{k}: {v}" for k, v in auth.items())]
    with socket.create_connection(("127.0.0.1", shared.proxy.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        answer = sock.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 400") and "<Code>EntityTooLarge</Code>" in answer


# ---------------------------------------------------------------- the store process itself

def test_the_store_socket_is_private(shared: S3Stack) -> None:
    folder = shared.store.socket.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(shared.store.socket.stat().st_mode)
    assert stat.S_IMODE(shared.store.socket.stat().st_mode) & 0o077 == 0
    assert shared.store.socket == socket_path(shared.workdir)
    assert len(str(shared.store.socket)) < 100
    assert store_answers(shared.store.socket)
    assert not store_answers(shared.workdir / "no-such.sock")


def test_a_store_on_tcp_checks_signatures_itself(tmp_path: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "installer.objectstore", "--data", str(tmp_path / "d"),
                              "--listen", f"127.0.0.1:{free_port()}"], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "must check signatures itself" in refused.stderr

    token_file = tmp_path / "secrets" / "token"
    from installer.secrets import read_or_create_secret

    token = read_or_create_secret(token_file)
    port = free_port()
    store = start_store(tmp_path, tmp_path / "objects", listen=f"127.0.0.1:{port}", token_file=token_file)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        good = s3_client(endpoint, credentials_for_token(token))
        good.put_object(Bucket=BUCKET, Key="direct", Body=b"direct path")
        assert good.get_object(Bucket=BUCKET, Key="direct")["Body"].read() == b"direct path"
        bad = s3_client(endpoint, Credentials(s3auth.ACCESS_KEY_ID, "1" * 64))
        assert _code(lambda: bad.get_object(Bucket=BUCKET, Key="direct")) == (403, "SignatureDoesNotMatch")
        unsigned = s3_client(endpoint, Credentials("a", "b"), signature_version=botocore.UNSIGNED)
        assert _code(lambda: unsigned.list_buckets()) == (403, "AccessDenied")
    finally:
        store.stop()


def test_a_second_store_on_the_same_socket_is_refused(shared: S3Stack) -> None:
    again = subprocess.run([sys.executable, "-m", "installer.objectstore", "--data", str(shared.store.data_dir),
                            "--listen", shared.store.listen], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already answers" in again.stderr
    assert _good(shared).head_bucket(Bucket=BUCKET)["ResponseMetadata"]["HTTPStatusCode"] == 200


# ---------------------------------------------------------------- the verifier on its own

def test_verifier_matches_botocore_and_refuses_malformed_headers() -> None:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    creds = credentials_for_token("a-token-of-sufficient-length")
    request = AWSRequest(method="GET", url="http://stack.example:7860/s3/metaflow?list-type=2&prefix=a%20b%2Fc",
                         headers={"x-amz-content-sha256": s3auth.EMPTY_SHA256})
    S3SigV4Auth(BotoCredentials(creds.access_key_id, creds.secret_access_key), "s3", "eu-west-3").add_auth(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers["host"] = "stack.example:7860"

    def lookup(key: str) -> str | None:
        return creds.secret_access_key if key == creds.access_key_id else None

    result = s3auth.verify("GET", "/s3/metaflow", "list-type=2&prefix=a%20b%2Fc", headers, lookup)
    assert result.access_key_id == s3auth.ACCESS_KEY_ID and not result.presigned
    for changed in ({"host": "other.example"}, {"x-amz-date": "20200101T000000Z"},
                    {"authorization": headers["authorization"].replace("Signature=", "Signature=0")},
                    {"authorization": "AWS metaflow-stack:abc"}):
        with pytest.raises(S3AuthError):
            s3auth.verify("GET", "/s3/metaflow", "list-type=2&prefix=a%20b%2Fc", {**headers, **changed}, lookup)
    with pytest.raises(S3AuthError):
        s3auth.verify("GET", "/s3/metaflow", "list-type=2&prefix=a%20b", headers, lookup)
    assert "secret" not in repr(creds) and creds.secret_access_key not in repr(creds)


# ---------------------------------------------------------------- connect picks the store

def test_connect_configures_the_store_and_local_stays_an_option(shared: S3Stack, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("METAFLOW_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("METAFLOW_HOME", str(tmp_path / "mfconfig"))
    # connect() checks the metadata service's /ping: this stack's test upstream answers it.
    line = format_connection(shared.url, shared.token)
    result = connect_stack(line, set_env=False)
    assert result.datastore.kind == "s3"
    settings = json.loads((tmp_path / "mfconfig" / "config.json").read_text())
    assert settings["METAFLOW_DEFAULT_DATASTORE"] == "s3"
    assert settings["METAFLOW_DATASTORE_SYSROOT_S3"] == "s3://metaflow/data"
    assert settings["METAFLOW_S3_ENDPOINT_URL"] == f"{shared.url}/s3"
    params = json.loads(settings["METAFLOW_DATATOOLS_CLIENT_PARAMS"])
    assert params == {"aws_access_key_id": "metaflow-stack", "region_name": "us-east-1",
                      "aws_secret_access_key": shared.credentials().secret_access_key}
    text = "\n".join(result.lines())
    assert params["aws_secret_access_key"] not in text and params["aws_secret_access_key"] not in repr(result)

    local = connect_stack(line, set_env=False, write_profile=False, datastore="local")
    assert local.datastore.kind == "local" and local.settings["METAFLOW_DEFAULT_DATASTORE"] == "local"
    assert "NOT their logs, artifacts or cards" in local.datastore.statement


def test_connect_requiring_s3_fails_clearly_without_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAFLOW_HOME", str(tmp_path / "mfconfig"))
    stack = start_s3_stack(tmp_path / "nostore")
    try:
        stack.proxy.stop()
        from .helpers_proxy import start_proxy

        plain = start_proxy(stack.workdir, metadata_url=stack.ui.url, ui_url=stack.ui.url,
                            static_dir=stack.proxy.static_dir, token_file=stack.proxy.token_file)
        try:
            line = format_connection(plain.url, stack.token)
            with pytest.raises(NoObjectStore) as caught:
                connect_stack(line, set_env=False, write_profile=False, datastore="s3")
            assert caught.value.hint and "datastore='local'" in caught.value.hint
            assert connect_stack(line, set_env=False, write_profile=False).datastore.kind == "local"
        finally:
            plain.stop()
    finally:
        stack.stop()

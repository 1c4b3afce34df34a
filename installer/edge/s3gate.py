"""The `/s3/` route: S3 clients (boto3, Metaflow's datastore) admitted by their SigV4 signature.

S3 clients cannot send the token, so here a request must be signed (header or
presigned URL) with the credentials derived from the token, or with the
stack-internal pair (installer/s3auth.py); anything else gets S3's 403 XML. The
signature covers the Host as received (the public host name behind the tunnel)
and the path with its "/s3" prefix.

What a signature covers is all that is relayed. It does not cover the body of a
presigned URL or of an UNSIGNED-PAYLOAD request, so a body is refused on the
methods where no S3 operation has one (GET, HEAD, DELETE): relayed, such a body
would be read by the store as the next request on the pooled connection (request
smuggling: a read-only presigned GET turned into any write). The store checks
signatures again on its socket (it is given the same credentials and the "/s3"
prefix), so a request that somehow got past this gate still needs a signature
for exactly what it does; the Host and Authorization headers are therefore
relayed as received.
"""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from ..s3auth import CredentialSource, S3AuthError
from ..s3auth import verify as verify_sigv4
from .access import REFUSAL, Client, Gate
from .client import Pool
from .config import S3_PREFIX
from .forward import Upstream, forward, request_headers, send_continue
from .pages import s3_error
from .routes import S3_BODYLESS, body_problem, method_problem, path_problem

__all__ = ["S3Gate"]


class S3Gate:
    upstream = Upstream("object store", URL("http://objectstore"), "/")

    def __init__(self, credentials: CredentialSource | None, gate: Gate, max_body: int) -> None:
        self.credentials = credentials   # None: no access control (--no-auth)
        self.gate = gate
        self.max_body = max_body

    async def handle(self, request: web.BaseRequest, client: Client,
                     pool: Pool) -> tuple[web.StreamResponse, bool]:
        """(the answer, whether a valid signature admitted the request). A valid signature is relayed at
        once; a refused one is a failed credential (access.py: slowed down, then S3's 403 or 503 SlowDown)."""
        raw_path, _, raw_query = request.raw_path.partition("?")
        head = request.method == "HEAD"
        problem = method_problem(request.method)
        if problem:
            return s3_error(405, "MethodNotAllowed", problem, raw_path, head), False
        if self.credentials is not None:
            try:
                verify_sigv4(request.method, raw_path, raw_query, request.headers, self.credentials)
            except S3AuthError as exc:
                request[REFUSAL] = f"{exc.code}: {exc.message}"
                retry = await self.gate.refuse(client)
                if retry is not None:
                    response = s3_error(503, "SlowDown", "too many failed signatures on this stack; retry later",
                                        raw_path, head)
                    response.headers["Retry-After"] = str(max(1, round(retry)))
                    return response, False
                return s3_error(exc.status, exc.code, exc.message, raw_path, head), False
        return await self._relay(request, client, pool, raw_path, head), True

    async def _relay(self, request: web.BaseRequest, client: Client, pool: Pool, raw_path: str,
                     head: bool) -> web.StreamResponse:
        problem = path_problem(raw_path, api=False) or body_problem(request, S3_BODYLESS)
        if problem:
            return s3_error(400, "InvalidRequest", problem, raw_path, head)
        if (request.content_length or 0) > self.max_body:
            return s3_error(400, "EntityTooLarge", f"one request may carry at most {self.max_body} "
                            "bytes; upload larger objects in parts (multipart upload)", raw_path, head)
        refused = await send_continue(request)
        if refused is not None:
            return refused
        rest = request.raw_path[len(S3_PREFIX):]
        if not rest.startswith("/"):
            rest = "/" + rest
        headers = request_headers(request, client, keep=("host",))
        return await forward(request, self.upstream, rest, pool, headers)

"""What the entry point answers by itself: JSON errors, S3 errors, the sign-in page.

No page quotes anything from the request except through html.escape, and none
carries a credential (error pages for malformed requests are fixed text).
"""

from __future__ import annotations

import html

from aiohttp import web

__all__ = ["HOW_TO_AUTHENTICATE", "SERVER_NAME", "json_error", "json_response", "login_page", "s3_error", "ui_starting_page"]

# Every answer's Server header: aiohttp's default names its and Python's versions.
SERVER_NAME = "metaflow-stack"

HOW_TO_AUTHENTICATE = ("send header x-api-key: <token> (METAFLOW_SERVICE_AUTH_KEY) "
                       "or open /?token=<token> in a browser")


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> web.Response:
    response = web.json_response(body, status=status, headers=headers)
    response.headers["Cache-Control"] = "no-store"
    return response


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(status, {"error": message}, headers)


_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Metaflow: sign in</title>
<style>
body{{font-family:system-ui,sans-serif;background:#f5f6f8;margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}}
main{{background:#fff;border:1px solid #dde;border-radius:8px;padding:2rem;max-width:28rem;width:90%}}
h1{{font-size:1.3rem;margin-top:0}} input{{width:100%;box-sizing:border-box;padding:.5rem;margin:.5rem 0 1rem;font-family:monospace}}
button{{padding:.5rem 1.2rem}} .error{{color:#b00020}} code{{background:#eef;padding:0 .2rem}}
</style></head>
<body><main id="login">
<h1>Metaflow: access token needed</h1>
{error}
<p>This Metaflow stack is protected. Paste its access token (shown by <code>python -m installer url</code>
on the machine that runs it).</p>
<form method="get" action="/" autocomplete="off">
<label for="token">Access token</label>
<input id="token" name="token" type="password" required autofocus>
<button type="submit">Open the UI</button>
</form>
</main></body></html>
"""


_STARTING_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="2">
<title>Metaflow: UI starting</title>
<style>
body{font-family:system-ui,sans-serif;background:#f5f6f8;margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}
main{background:#fff;border:1px solid #dde;border-radius:8px;padding:2rem;max-width:30rem;width:90%}
h1{font-size:1.3rem;margin-top:0} code{background:#eef;padding:0 .2rem}
</style></head>
<body><main id="starting">
<h1>The Metaflow UI is starting</h1>
<p>The stack is up and already tracks runs; the UI backend needs a few more seconds.
This page reloads by itself.</p>
<p>If it stays here, <code>python -m installer status</code> says why and
<code>python -m installer logs ui-backend</code> shows its log.</p>
</main></body></html>
"""


def ui_starting_page() -> web.Response:
    """The answer to a browser while the UI backend is not answering yet: it reloads every 2 s."""
    response = web.Response(status=503, text=_STARTING_PAGE, content_type="text/html")
    response.headers.update({
        "Cache-Control": "no-store",
        "Retry-After": "2",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
    })
    return response


def login_page(error: str | None = None) -> web.Response:
    note = f'<p class="error" id="error">{html.escape(error)}</p>' if error else ""
    response = web.Response(status=401, text=_LOGIN_PAGE.format(error=note), content_type="text/html")
    response.headers.update({
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                   "frame-ancestors 'none'",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    })
    return response


def s3_error(status: int, code: str, message: str, resource: str, head: bool = False) -> web.Response:
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{html.escape(code)}</Code><Message>{html.escape(message)}</Message>"
            f"<Resource>{html.escape(resource)}</Resource></Error>")
    response = web.Response(status=status, body=None if head else body.encode(), content_type="application/xml")
    response.headers["Cache-Control"] = "no-store"
    return response

"""What Serve's HTTP proxy answers before the app sees a request, in OpenAI's error shape.

Serve's proxy parses HTTP itself (uvicorn) and reads some headers before any route of
the Router runs, so two kinds of bad input never reach the app: a request its HTTP
parser refuses (a control character in a header value, such as a garbage
``Authorization`` header, or a malformed request line), which uvicorn answered with a
plain-text 400, and a header the proxy decodes as UTF-8 (``X-Request-ID``,
``X-Session-ID``, ...) holding other bytes, which failed in the proxy as a plain 500.
:func:`proxy_middlewares` runs in the proxy process when Ray is started with
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy.proxy_middlewares``
(Serve's hook for the proxy's middlewares; part of ``pace_core.numa.NODE_ENV``, which
`python -m cluster.start_node` and the README's serve command set): it makes uvicorn
answer the first kind in OpenAI's error shape and returns a middleware that answers the
second with a 400 naming the header. Without it both still get their 4xx/500, in plain
text.
"""
from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("ray.serve")

# headers Serve's proxy decodes as UTF-8 before the app runs (in Ray 2.60), the
# session header aside (its name is Serve's setting, RAY_SERVE_SESSION_ID_HEADER_KEY)
DECODED_HEADERS = (b"x-request-id", b"serve_multiplexed_model_id", b"x-request-timeout-seconds",
                   b"x-serve-disconnect-disabled")


def _normal(header: bytes) -> bytes:
    """A header name as Serve's proxy matches it: case and - or _ aside."""
    return header.lower().replace(b"-", b"_")


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


def _send_openai_400(self, msg: str) -> None:
    """uvicorn's answer to a request its HTTP parser refused, in OpenAI's error shape."""
    body = _error_body("the request is not valid HTTP/1.1 (a header holding a control character, or a malformed "
                       "request line): fix the client's request; an API key goes in 'Authorization: Bearer <key>'",
                       "invalid_http_request")
    self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
    self.transport.close()


def _openai_parse_errors() -> None:
    """Make uvicorn's HTTP/1.1 protocols (httptools and h11, whichever Serve's proxy
    uses) answer requests they cannot parse with :func:`_send_openai_400`."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for protocol in (getattr(httptools_impl, "HttpToolsProtocol", None), getattr(h11_impl, "H11Protocol", None)):
        if protocol is not None and hasattr(protocol, "send_400_response"):
            protocol.send_400_response = _send_openai_400


class UndecodableHeaders:
    """An ASGI middleware before Serve's proxy logic: a 400 in OpenAI's error shape for a
    header the proxy would decode as UTF-8 that is not UTF-8."""

    def __init__(self, app):
        self.app = app
        session = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id").encode()  # Serve's setting
        self.decoded = {_normal(h) for h in (*DECODED_HEADERS, session)}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if _normal(name) in self.decoded:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        body = _error_body(f"the {name.decode('latin-1')} header is not valid UTF-8 text", "invalid_header")
                        await send({"type": "http.response.start", "status": 400,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                        await send({"type": "http.response.body", "body": body})
                        return
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """Serve's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): called once in
    the proxy process before its HTTP server starts."""
    from starlette.middleware import Middleware

    try:
        _openai_parse_errors()
    except Exception:  # another uvicorn: its plain-text 400 stays
        logger.warning("could not make the HTTP proxy answer unparsable requests in OpenAI's error shape", exc_info=True)
    return [Middleware(UndecodableHeaders)]

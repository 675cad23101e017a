"""Logging: one line per event, as text or (`--log-format json`) as JSON objects.

Every line logged while serving a request carries its `request_id`. The id lives in a context
variable: set by the server that received the request (from `X-Request-Id`, or new), inherited
by every task the request starts (piece fetches, schedule calls), and sent on as
`X-Request-Id` by the clients, so one pull can be followed from mirror to scheduler to parent.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                         default=None)
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


# New ids: 64 random bits as 16 hex digits. An id names a request in logs, it guards nothing,
# so a seeded PRNG will do (~1 us, against ~5 us for uuid4's urandom call on every request);
# reseeded in a forked child, so two processes never share a sequence.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_id() -> str:
    return f"{_ids.getrandbits(64):016x}"


def adopt(given: str | None) -> str:
    """The id a request goes by here: the caller's if well formed, else a new one."""
    return given if given and _ID_RE.match(given) else new_id()


def outgoing() -> dict[str, str]:
    """Headers that carry the current request id to the next hop."""
    rid = request_id.get()
    return {REQUEST_ID_HEADER: rid} if rid else {}


REQUEST_ID = web.RequestKey("naiad.request_id", str)


def take_id(request: web.BaseRequest) -> contextvars.Token[str | None]:
    """Give `request` its id and make it the current one; reset the token once it is served.
    For a server's own middleware when it folds this step into one with others."""
    rid = adopt(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = rid
    return request_id.set(rid)


@web.middleware
async def _with_request_id(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    token = take_id(request)
    try:
        return await handler(request)
    finally:
        request_id.reset(token)


async def _answer_with_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]


def request_ids(app: web.Application, middleware: bool = True) -> web.Application:
    """Give every request of `app` an id (the caller's `X-Request-Id` if well formed), make it
    the current one while it is served, and answer with it. `middleware=False`: the app's own
    first middleware calls `take_id` (one middleware instead of two on every request)."""
    if middleware:
        app.middlewares.insert(0, _with_request_id)
    app.on_response_prepare.append(_answer_with_id)
    return app


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        return text + "".join(f" {k}={v}" for k, v in extra.items())


def setup(fmt: str = "text", level: str = "INFO") -> None:
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

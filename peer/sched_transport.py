"""Calls to a scheduler: signing, and what counts as an answer.

A scheduler answers JSON: the reply model with 2xx, `{"error": ..., "code": ...}` with 4xx and
5xx. Anything else — HTML with 200, JSON of the wrong shape, a truncated or empty body, a
redirect, a status no scheduler sends, a broken connection — is not a scheduler this peer can
use (`SchedulerUnavailable` with `unusable`): the session fails over to the next URL. A
scheduler's own 5xx (its state store is down) is unavailable but not unusable; its 4xx is
`SchedulerRefused`, with the code the caller acts on.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import aiohttp
from pydantic import BaseModel, TypeAdapter, ValidationError

from common import auth
from common.log import outgoing
from common.models import ErrorBody
from common.tasks import describe

R = TypeVar("R", bound=BaseModel)
CONNECT_SECONDS = 2.0
_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])
# Where the schedule call being made takes the parts of its answer, each its reply model, as
# they come (a transport that can ask for them: FramedTransport, when the scheduler offers
# them); the call's reply is then the rest. None, or any other transport: one reply. Set by
# SchedulerClient.schedule around its call, which the session passes through as it is.
PARTS: ContextVar[Callable[[Any], None] | None] = ContextVar("schedule_parts", default=None)


class SchedulerUnavailable(Exception):
    """No scheduler answered. `unusable`: what answered cannot be used at all (down, or not
    a scheduler), as opposed to a scheduler saying it is briefly unavailable."""

    def __init__(self, message: str, unusable: bool = True) -> None:
        super().__init__(message)
        self.unusable = unusable


class SchedulerRefused(Exception):
    """A scheduler answered with a 4xx the caller must handle; `code` says why, when the
    caller must act on it (common.models' error codes)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.code = code


def _snippet(raw: bytes) -> str:
    return repr(raw[:60].decode(errors="replace")) if raw else "no body"


def parse_reply(status: int, raw: bytes, reply: type[R] | None, where: str) -> R | None:
    """The reply of a call answered `status` with `raw`, or the exception that says why it is
    none. Pure: every way a wrong or broken service can answer is decided here."""
    if 200 <= status < 300:
        try:
            if reply is None:
                _OBJECT.validate_json(raw)  # a scheduler acknowledges with a JSON object
                return None
            return reply.model_validate_json(raw)
        except ValidationError as e:
            raise SchedulerUnavailable(
                f"{where} answered {status} with {_snippet(raw)}, not a scheduler's reply "
                f"({e.error_count()} problems, first: {e.errors()[0]['msg']})") from None
    if 400 <= status < 600:
        try:
            body = ErrorBody.model_validate_json(raw)
        except ValidationError:
            raise SchedulerUnavailable(f"{where} answered {status} with {_snippet(raw)}, "
                                       f"not a scheduler's error") from None
        if status >= 500:
            raise SchedulerUnavailable(f"{where}: {status}: {body.error[:300]}", unusable=False)
        raise SchedulerRefused(status, body.error[:300], body.code)
    raise SchedulerUnavailable(f"{where} answered {status}, which no scheduler does")


class Transport(Protocol):
    """One call to one scheduler: the seam the session and its parts are tested through."""

    async def post(self, url: str, path: str, body: BaseModel | None, reply: type[R] | None,
                   seconds: float = 5.0) -> R | None: ...


class HttpTransport:
    """POSTs signed with the cluster secret (when there is one), answers through
    `parse_reply`."""

    def __init__(self, session: aiohttp.ClientSession, secret: bytes | None) -> None:
        self.session = session
        self.secret = secret

    async def post(self, url: str, path: str, body: BaseModel | None, reply: type[R] | None,
                   seconds: float = 5.0) -> R | None:
        headers = {"Content-Type": "application/json", **outgoing()}
        data = (body.model_dump_json() if body is not None else "{}").encode()
        if self.secret is not None:
            headers[auth.HEADER] = auth.sign(self.secret, "POST", path, data)
        timeout = aiohttp.ClientTimeout(total=seconds, sock_connect=min(CONNECT_SECONDS,
                                                                        seconds))
        try:
            # Not redirected: a scheduler never redirects, a login page in front of one does.
            async with self.session.post(url + path, data=data, headers=headers,
                                         timeout=timeout, allow_redirects=False) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise SchedulerUnavailable(f"{url}: {describe(e)}") from e
        return parse_reply(status, raw, reply, url)

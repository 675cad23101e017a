"""The scheduler's one middleware (scheduler/api.py `edge`) keeps every contract the four it
replaced kept: the request id (adopted, or new, answered, on the log lines), the signature
(required on internal calls, checked when present, once), refusals as JSON with their code,
and the state store's failures as 503."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from multidict import CIMultiDict

from common import auth
from common.log import REQUEST_ID_HEADER, _RequestIdFilter, new_id
from common.models import UNKNOWN_PEER, Announce, PeerRegistration
from scheduler.server import SchedulerConfig, SchedulerService
from tests.cluster import free_port

SECRET = b"edge-test-secret"
TASK = "sha256:" + "ab" * 32


async def _service(**config: object) -> SchedulerService:
    svc = SchedulerService(SchedulerConfig(listen="127.0.0.1:0", udp=None, secret=SECRET,
                                           **config))  # type: ignore[arg-type]
    await svc.start()
    return svc


@pytest.fixture
async def sched() -> AsyncIterator[SchedulerService]:
    svc = await _service()
    yield svc
    await svc.stop()


async def _post(s: aiohttp.ClientSession, url: str, path: str, body: bytes,
                headers: dict[str, str] | None = None, sign: bool = True
                ) -> tuple[int, CIMultiDict[str], dict]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if sign:
        h[auth.HEADER] = auth.sign(SECRET, "POST", path, body)
    async with s.post(url + path, data=body, headers=h) as r:
        return r.status, CIMultiDict(r.headers), json.loads(await r.read())


def test_the_signature_is_the_documented_hmac_whatever_the_secret() -> None:
    """The keyed HMAC is copied per message (auth._keyed), not keyed again: the MAC must stay
    hmac-sha256(secret, ts \\n nonce \\n METHOD \\n path \\n sha256(body)), what peers of
    every version send, for each secret a process holds."""
    body = b'{"peer_id":"p1"}'
    for secret in (b"one", b"two", b"one"):
        header = auth.sign(secret, "post", "/api/v1/schedule", body, now=1234, nonce="ab" * 16)
        message = f"1234\n{'ab' * 16}\nPOST\n/api/v1/schedule\n" \
                  f"{hashlib.sha256(body).hexdigest()}".encode()
        assert header == f"1234.{'ab' * 16}." + hmac.new(secret, message, "sha256").hexdigest()


def test_new_ids_are_16_hex_digits_and_differ() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


async def test_request_id_is_adopted_answered_and_logged(
        sched: SchedulerService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(_RequestIdFilter())
    caplog.set_level(logging.DEBUG, logger="naiad.scheduler.api")
    reg = PeerRegistration(id="p1", upload_addr="127.0.0.1:9").model_dump_json().encode()
    ask = json.dumps({"peer_id": "p1", "task_id": TASK, "pieces": [0]}).encode()
    async with aiohttp.ClientSession() as s:
        status, headers, _ = await _post(s, sched.url, "/api/v1/peers", reg,
                                         {REQUEST_ID_HEADER: "pull-7"})
        assert status == 200 and headers[REQUEST_ID_HEADER] == "pull-7"
        status, headers, _ = await _post(s, sched.url, "/api/v1/peers", reg,
                                         {REQUEST_ID_HEADER: "bad id!"})
        assert status == 200 and re.fullmatch(r"[0-9a-f]{16}", headers[REQUEST_ID_HEADER])
        await _post(s, sched.url, "/api/v1/tasks",
                    json.dumps({"task_id": TASK, "length": 1 << 20}).encode())
        status, headers, _ = await _post(s, sched.url, "/api/v1/schedule", ask,
                                         {REQUEST_ID_HEADER: "pull-8"})
        assert status == 200 and headers[REQUEST_ID_HEADER] == "pull-8"
        # Refusals carry it too: the signature's, and the route's.
        status, headers, body = await _post(s, sched.url, "/api/v1/schedule", ask,
                                            {REQUEST_ID_HEADER: "pull-9"}, sign=False)
        assert status == 401 and headers[REQUEST_ID_HEADER] == "pull-9"
        assert "cluster secret required" in body["error"]
    logged = [r for r in caplog.records if r.getMessage().startswith("schedule ")]
    assert [getattr(r, "request_id", None) for r in logged] == ["pull-8"]


async def test_refusals_are_json_with_their_code(sched: SchedulerService) -> None:
    ann = Announce(peer_id="nobody", task_id=TASK).model_dump_json().encode()
    async with aiohttp.ClientSession() as s:
        # A replayed signature: the second use of one header is refused.
        reg = PeerRegistration(id="p2", upload_addr="127.0.0.1:9").model_dump_json().encode()
        header = {auth.HEADER: auth.sign(SECRET, "POST", "/api/v1/peers", reg)}
        assert (await _post(s, sched.url, "/api/v1/peers", reg, header, sign=False))[0] == 200
        status, _, body = await _post(s, sched.url, "/api/v1/peers", reg, header, sign=False)
        assert status == 401 and "replayed" in body["error"]
        # A heartbeat from a peer this scheduler does not know: 404 with the code to act on.
        status, _, body = await _post(s, sched.url, "/api/v1/peers/nobody/heartbeat", b"{}")
        assert status == 404 and body["code"] == UNKNOWN_PEER
        status, _, body = await _post(s, sched.url, "/api/v1/peers/p2/heartbeat", b"{}")
        assert (status, body) == (200, {})
        status, _, body = await _post(s, sched.url, "/api/v1/announce", b'{"peer_id": 3}')
        assert status == 400 and body["error"].startswith("invalid request body")
        status, _, body = await _post(s, sched.url, "/api/v1/nowhere", ann)
        assert status == 404 and "error" in body
        async with s.get(sched.url + "/metrics") as r:
            text = await r.text()
    beats = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'naiad_scheduler_heartbeats_total\{result="(\w+)",transport="http"\} (\S+)', text)}
    assert beats == {"accepted": 1.0, "unknown": 1.0, "dropped": 0.0}


async def test_a_store_that_is_down_answers_503() -> None:
    svc = await _service(redis=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        ann = Announce(peer_id="p1", task_id=TASK).model_dump_json().encode()
        async with aiohttp.ClientSession() as s:
            status, headers, body = await _post(s, svc.url, "/api/v1/announce", ann,
                                                {REQUEST_ID_HEADER: "pull-503"})
        assert status == 503 and headers[REQUEST_ID_HEADER] == "pull-503"
        assert body["error"].startswith("scheduler state store unavailable")
    finally:
        await svc.stop()

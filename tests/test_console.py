"""The operator console in a real browser: a live cluster (a scheduler, three peers, a blob pulled
through each), the page rendered by headless Chromium, and what it shows checked against the
scheduler's own JSON API. The screenshot is kept in tests/artifacts/console.png."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import struct
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    fetch,
    member_session,
    pull_digest,
    push_blob,
    until,
)

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = ROOT / "scheduler" / "console"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MiB = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed (.ci/run installs it: apt-get install chromium)"
    return binary


async def chromium(url: str, *args: str, seconds: float = 90.0) -> str:
    """Run headless Chromium on `url` with a fresh profile; its stdout (e.g. --dump-dom).

    --virtual-time-budget lets the page's scripts run (and their fetches finish) before the
    DOM is dumped or the screenshot taken: Chromium exits when the page is idle, not on a timer.
    """
    with tempfile.TemporaryDirectory(prefix="naiad-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--virtual-time-budget=5000", *args, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), seconds)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{err.decode()[-4000:]}"
    return out.decode()


class Dom(HTMLParser):
    """The bits of a rendered page the tests read: text by element id, rows by data attribute."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.text_by_id: dict[str, str] = {}
        self.peer_rows: dict[str, str] = {}   # data-peer-id -> the row's text
        self.task_rows: dict[str, str] = {}   # data-task-id -> the row's text
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []
        self._open: list[tuple[str, dict[str, str], list[str]]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script" and "src" in a:
            self.scripts.append(a["src"])
        if tag == "link" and a.get("rel") == "stylesheet":
            self.stylesheets.append(a["href"])
        if tag in ("meta", "link", "br", "img", "input", "hr"):
            return
        self._open.append((tag, a, []))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, a, text = self._open.pop()
            joined = " ".join(" ".join(text).split())
            if self._open:
                self._open[-1][2].append(joined)
            if "id" in a:
                self.text_by_id[a["id"]] = joined
            if "data-peer-id" in a:
                self.peer_rows[a["data-peer-id"]] = joined
            if "data-task-id" in a:
                self.task_rows[a["data-task-id"]] = joined
            if t == tag:
                return

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][2].append(data)


async def _stats(scheduler: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"{scheduler}/api/v1/stats") as r:
        assert r.status == 200
        return await r.json()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


async def test_console_shows_every_peer_and_the_saving_the_api_reports(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(3 * MiB + 12345)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peers = await asyncio.gather(*(
        cluster.peer(f"console-peer-{i}", sched.url, origin.url,
                     *(["--seed"] if i == 0 else []), "--idc", f"idc-{i % 2}")
        for i in range(3)))
    for p in peers:  # one after another: the first from the origin, the others from peers
        assert await pull_digest(f"{p.url}/v2/{repo}/blobs/{digest}") == digest

    async def reported() -> bool:  # peers report their counters with each heartbeat
        status, _, body = await fetch(f"{sched.url}/api/v1/tasks/{digest}")
        sealed = status == 200 and json.loads(body)["sealed"]
        return sealed and (await _stats(sched.url))["served_bytes"] == 3 * len(blob)
    await until(reported, 20, "the task sealed and every served byte reported")
    stats = await _stats(sched.url)
    assert stats["savings_ratio"] > 0.5, stats
    async with member_session() as s, \
            s.delete(f"{sched.url}/api/v1/peers/console-peer-2") as r:  # cordon one (signed)
        assert r.status == 200, await r.text()

    dom = Dom(await chromium(f"{sched.url}/", "--dump-dom"))

    assert set(dom.peer_rows) == {p.name for p in peers}, dom.peer_rows
    seed_row = dom.peer_rows["console-peer-0"]
    assert "seed" in seed_row and "idc-0" in seed_row, seed_row
    assert "idc-1" in dom.peer_rows["console-peer-1"]
    assert "cordoned" in dom.peer_rows["console-peer-2"]
    assert "cordoned" not in dom.peer_rows["console-peer-1"]
    assert dom.text_by_id["cordoned-count"] == "1"
    assert dom.text_by_id["savings-ratio"] == f"{stats['savings_ratio'] * 100:.1f}%"
    assert dom.text_by_id["peer-count"] == "3"
    assert set(dom.task_rows) == {digest}
    assert "sealed" in dom.task_rows[digest], dom.task_rows[digest]
    assert dom.text_by_id["served-bytes"] == "9.0 MiB"  # 3 x (3 MiB + 12345 B), rounded
    assert dom.text_by_id["status"].startswith("updated"), dom.text_by_id["status"]

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "console.png"
    shot.unlink(missing_ok=True)
    await chromium(f"{sched.url}/", f"--screenshot={shot}", "--window-size=1280,900",
                   "--hide-scrollbars")
    data = shot.read_bytes()
    assert len(data) > 10_000, "the screenshot is suspiciously small"
    assert png_size(data) == (1280, 900)


async def test_console_shows_an_error_when_the_api_does_not_answer(tmp_path: Path) -> None:
    """The page opened where no scheduler API answers (from a file): it says so instead of
    showing stale or empty numbers as if they were live."""
    (tmp_path / "console.js").write_bytes((CONSOLE / "console.js").read_bytes())
    page = tmp_path / "index.html"
    page.write_text((CONSOLE / "index.html").read_text()
                    .replace('src="/console/console.js"', 'src="console.js"'))
    dom = Dom(await chromium(page.as_uri(), "--dump-dom"))
    assert "unreachable" in dom.text_by_id["status"], dom.text_by_id["status"]
    assert dom.text_by_id["savings-ratio"] == "\u2013"  # the placeholder: no figure
    assert dom.peer_rows == {}


async def test_console_files_are_served_with_a_strict_policy(cluster: Cluster) -> None:
    sched = await cluster.scheduler()
    status, headers, body = await fetch(f"{sched.url}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    dom = Dom(body.decode())
    assert dom.scripts == ["/console/console.js"]
    assert dom.stylesheets == ["/console/console.css"]
    for path, kind in (("/console/console.js", "text/javascript"),
                       ("/console/console.css", "text/css")):
        status, headers, body = await fetch(sched.url + path)
        assert status == 200 and headers["Content-Type"].startswith(kind), path
        assert body == (CONSOLE / path.rsplit("/", 1)[1]).read_bytes()
    for missing in ("/console/nope.js", "/console/..%2Fapi.py", "/console/__init__.py"):
        status, _, _ = await fetch(sched.url + missing)
        assert status == 404, missing


COMMENTS = {"index.html": r"<!--.*?-->", "console.js": r"^\s*//.*?$",
            "console.css": r"/\*.*?\*/"}


@pytest.mark.parametrize("name", sorted(COMMENTS))
def test_console_loads_nothing_from_elsewhere(name: str) -> None:
    """Offline machines: no CDN, no external font, no absolute URL; everything from the
    scheduler itself."""
    code = re.sub(COMMENTS[name], "", (CONSOLE / name).read_text(), flags=re.S | re.M)
    found = re.findall(r"\w+://|[\"'(]//|url\(|@import", code)
    assert not found, f"{name} refers to {found}"
    assert {p.name for p in CONSOLE.iterdir()} == set(COMMENTS), "a console file is untested"


def test_console_script_builds_no_html_from_strings() -> None:
    """Peer ids and labels come from the network: the script renders through textContent and
    setAttribute only, never by parsing strings as HTML."""
    script = (CONSOLE / "console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in script, sink

"""The operator console in a real browser: a live cluster (a scheduler, three peers, a blob pulled
through each), the page rendered by headless Chromium, and what it shows checked against the
scheduler's own JSON API: the figures and tables, and the charts' drawn series and piece grid
against `/api/v1/history` and `/api/v1/tasks/{id}`. The screenshot is kept in
tests/artifacts/console.png (docs/console.png is a copy of one)."""

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
SHOT = (1280, 1360)  # the whole page: cards, charts, peers, tasks and the piece grid


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
        self.series: dict[str, dict[str, str]] = {}  # data-series -> the path's attributes
        self.grid: dict[str, str] = {}  # the piece grid's attributes
        self.grid_rows: list[dict[str, str]] = []  # its holder rows' attributes, in order
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
        if tag == "path" and "data-series" in a:
            self.series[a["data-series"]] = a
        if tag == "svg" and a.get("id") == "piece-grid":
            self.grid = a
        if tag == "g" and "data-row" in a:
            self.grid_rows.append(a)
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


async def _get(url: str) -> dict:
    """Unsigned, as the browser asks."""
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _stats(scheduler: str) -> dict:
    return await _get(f"{scheduler}/api/v1/stats")


async def _sampled(scheduler: str, served: int) -> None:
    """Until the history has a sample with `served` bytes served to clients."""
    async def seen() -> bool:
        return served in (await _get(f"{scheduler}/api/v1/history"))["served_bytes"]
    await until(seen, 20, f"a history sample with {served} bytes served")


def drawn(dom: Dom, name: str) -> list[tuple[float, float]]:
    """A drawn series as (t, value) pairs, after checking that its line is those values: one
    point per value, x affine in t, y affine (and falling) in the value."""
    path = dom.series[name]
    ts = [float(t) for t in path["data-t"].split(",") if t]
    values = [float(v) for v in path["data-values"].split(",") if v]
    points = [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+) (-?[\d.]+)",
                                                           path["d"])]
    assert len(ts) == len(values) == len(points) >= 2, (name, path)

    def affine(xs: list[float], ys: list[float]) -> float:
        """The slope of ys over xs, checked to be one line within the drawing's rounding."""
        lo, hi = xs.index(min(xs)), xs.index(max(xs))
        if xs[lo] == xs[hi]:
            assert max(ys) - min(ys) <= 0.1, (name, ys)
            return 0.0
        slope = (ys[hi] - ys[lo]) / (xs[hi] - xs[lo])
        for x, y in zip(xs, ys, strict=True):
            assert abs(ys[lo] + slope * (x - xs[lo]) - y) <= 0.15, (name, x, y)
        return slope

    assert affine(ts, [x for x, _ in points]) > 0
    assert affine(values, [y for _, y in points]) <= 0  # SVG's y grows downwards
    return list(zip(ts, values, strict=True))


def api_series(h: dict, values: list[float | None], until_t: float) -> list[tuple[float, float]]:
    """The API's points of a series up to a time: the page drew what it read, and a sample may
    have been taken since."""
    return [(t, v) for t, v in zip(h["t"], values, strict=True) if v is not None and t <= until_t]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


async def test_console_shows_every_peer_and_the_saving_the_api_reports(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(3 * MiB + 12345)
    digest = await push_blob(registry.url, repo, blob)
    part = os.urandom(4 * MiB + 999)  # a second task, held by two peers
    part_digest = await push_blob(registry.url, repo, part)
    sched = await cluster.scheduler()
    peers = await asyncio.gather(*(
        cluster.peer(f"console-peer-{i}", sched.url, origin.url,
                     *(["--seed"] if i == 0 else []), "--idc", f"idc-{i % 2}")
        for i in range(3)))
    for n, p in enumerate(peers, 1):  # the first from the origin, the others from peers
        assert await pull_digest(f"{p.url}/v2/{repo}/blobs/{digest}") == digest
        await _sampled(sched.url, n * len(blob))  # each pull in the history on its own
    for p in peers[:2]:
        assert await pull_digest(f"{p.url}/v2/{repo}/blobs/{part_digest}") == part_digest
    served = 3 * len(blob) + 2 * len(part)
    await _sampled(sched.url, served)

    async def reported() -> bool:  # peers report their counters with each heartbeat
        for task in (digest, part_digest):
            status, _, body = await fetch(f"{sched.url}/api/v1/tasks/{task}")
            if status != 200 or not json.loads(body)["sealed"]:
                return False
        return (await _stats(sched.url))["served_bytes"] == served
    await until(reported, 20, "both tasks sealed and every served byte reported")
    stats = await _stats(sched.url)
    assert stats["savings_ratio"] > 0.5, stats
    async with member_session() as s, \
            s.delete(f"{sched.url}/api/v1/peers/console-peer-2") as r:  # cordon one (signed)
        assert r.status == 200, await r.text()

    dom = Dom(await chromium(f"{sched.url}/#task={part_digest}", "--dump-dom"))

    assert set(dom.peer_rows) == {p.name for p in peers}, dom.peer_rows
    seed_row = dom.peer_rows["console-peer-0"]
    assert "seed" in seed_row and "idc-0" in seed_row, seed_row
    assert "idc-1" in dom.peer_rows["console-peer-1"]
    assert "cordoned" in dom.peer_rows["console-peer-2"]
    assert "cordoned" not in dom.peer_rows["console-peer-1"]
    assert dom.text_by_id["cordoned-count"] == "1"
    assert dom.text_by_id["savings-ratio"] == f"{stats['savings_ratio'] * 100:.1f}%"
    assert dom.text_by_id["peer-count"] == "3"
    assert set(dom.task_rows) == {digest, part_digest}
    assert "sealed" in dom.task_rows[digest], dom.task_rows[digest]
    assert dom.text_by_id["served-bytes"] == "17.0 MiB"  # 3 x 3 MiB + 2 x 4 MiB, rounded
    assert dom.text_by_id["status"].startswith("updated"), dom.text_by_id["status"]

    # The charts: what is drawn is the history the API gives (read after the page read it).
    h = await _get(f"{sched.url}/api/v1/history")
    for k in ("origin", "peer", "local"):
        line = drawn(dom, k)
        assert line == api_series(h, h["rates"][k], line[-1][0]), k
    assert max(v for _, v in drawn(dom, "origin")) > 0 and max(v for _, v in drawn(dom, "peer")) > 0
    saving = drawn(dom, "saving")
    assert saving == api_series(h, h["saving"], saving[-1][0])
    assert h["bytes"]["origin"][-1] == stats["bytes"]["origin"]  # the same totals as /stats
    assert h["saving_ratio"] == round(stats["savings_ratio"], 4)  # sampled from the start

    # The piece grid of the task in the address: every holder's row, without the holders' ids,
    # as the unsigned API gives it; a signed caller gets the same rows named.
    public = await _get(f"{sched.url}/api/v1/tasks/{part_digest}")
    async with member_session() as s, s.get(f"{sched.url}/api/v1/tasks/{part_digest}") as r:
        full = await r.json()
    assert dom.grid["data-task"] == part_digest and dom.grid["data-sealed"] == "true"
    rows = [(int(g["data-held"]), g["data-runs"]) for g in dom.grid_rows]
    assert rows == [(g["held"], ",".join(f"{a}-{b}" for a, b in g["runs"]))
                    for g in public["grid"]]
    assert rows == [(5, "0-4")] * 2  # 5 pieces of 1 MiB, both peers hold them all
    assert all("data-holder" not in row and g["holder"] is None for row, g in
               zip(dom.grid_rows, public["grid"], strict=True))
    assert [g["holder"] for g in full["grid"]] == ["console-peer-0", "console-peer-1"]
    assert [(g["held"], g["runs"]) for g in full["grid"]] == \
        [(g["held"], g["runs"]) for g in public["grid"]]
    # With no task in the address, the first listed.
    first = min(digest, part_digest)
    assert Dom(await chromium(f"{sched.url}/", "--dump-dom")).grid["data-task"] == first

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "console.png"
    shot.unlink(missing_ok=True)
    await chromium(f"{sched.url}/#task={part_digest}", f"--screenshot={shot}",
                   f"--window-size={SHOT[0]},{SHOT[1]}",
                   "--hide-scrollbars")
    data = shot.read_bytes()
    assert len(data) > 10_000, "the screenshot is suspiciously small"
    assert png_size(data) == SHOT


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

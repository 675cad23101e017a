"""Preheat: warm the seed peers with an image (or a URL) before anyone pulls it.

A job resolves the image's manifest through the registry API (a manifest list or index picks
linux/amd64), then every seed peer is handed each blob as work until some seed holds it whole;
the job is done when every blob is held, failed when resolution fails or no seed is there to
do it. The decision of what a seed should fetch is `work_for`, pure over the job and the
holders the store reports.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from common import ids, oci
from common.tasks import TaskSet

log = logging.getLogger("naiad.scheduler.preheat")
NO_SEED_SECONDS = 30.0  # a job with no seed peer to run it fails after this


class PreheatError(Exception):
    pass


@dataclass
class Item:
    """One blob (or file) a job wants on the seeds."""

    task_id: str
    url: str
    registry: str  # scheme://host
    digest: str | None
    size: int | None = None
    held_by: list[str] = field(default_factory=list)  # seeds holding it whole
    pieces: int = 0
    pieces_held: int = 0  # by the seed furthest along


@dataclass
class Job:
    id: str
    target: str  # the image reference or URL asked for
    state: str = "resolving"  # resolving, running, done, failed
    error: str | None = None
    items: list[Item] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def view(self) -> dict:
        total = sum(i.pieces for i in self.items)
        held = sum(i.pieces if i.held_by else i.pieces_held for i in self.items)
        return {
            "id": self.id, "target": self.target, "state": self.state, "error": self.error,
            "progress": round(held / total, 4) if total else (1.0 if self.state == "done"
                                                               else 0.0),
            "created": self.created, "finished": self.finished,
            "items": [{"task_id": i.task_id, "url": i.url, "size": i.size,
                       "held_by": i.held_by, "pieces": i.pieces, "pieces_held": i.pieces_held}
                      for i in self.items],
        }


async def resolve_image(session: aiohttp.ClientSession, reference: str) -> list[Item]:
    """The config and layers of an image, as items for the seeds."""
    ref = oci.parse_reference(reference)
    accept = {"Accept": ", ".join(oci.MANIFEST_TYPES)}
    async with session.get(ref.manifest_url(), headers=accept) as r:
        if r.status != 200:
            raise PreheatError(f"{ref.manifest_url()} answered {r.status}")
        document, media_type = await r.read(), r.headers.get("Content-Type", "")
    if oci.is_index(media_type, document):
        digest = oci.pick_platform(document)
        if digest is None:
            raise PreheatError(f"{reference} has no linux/amd64 manifest")
        async with session.get(ref.manifest_url(digest), headers=accept) as r:
            if r.status != 200:
                raise PreheatError(f"{ref.manifest_url(digest)} answered {r.status}")
            document = await r.read()
    try:
        blobs = oci.manifest_blobs(document)
    except (KeyError, ValueError, TypeError) as e:
        raise PreheatError(f"cannot read the manifest of {reference}: {e!r}") from None
    return [Item(task_id=b.digest, url=ref.blob_url(b.digest), registry=ref.registry,
                 digest=b.digest, size=b.size) for b in blobs]


def url_item(url: str, digest: str | None = None) -> Item:
    parts = aiohttp.client.URL(url)
    if parts.scheme not in ("http", "https") or not parts.host:
        raise PreheatError(f"not an http(s) URL: {url[:200]!r}")
    return Item(task_id=ids.task_id_for_url(url), url=url,
                registry=f"{parts.scheme}://{parts.raw_authority}", digest=digest)


def work_for(job: Job, seed_id: str) -> list[Item]:
    """What a seed should fetch: every item of a running job that no seed holds whole yet."""
    if job.state != "running":
        return []
    return [i for i in job.items if not i.held_by]


HolderView = Callable[[str], Awaitable[dict | None]]  # task id -> the store's task view


class JobBook:
    """Preheat jobs of this scheduler process."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._tasks = TaskSet("preheat")

    def create(self, target: str, resolve: Callable[[], Awaitable[list[Item]]]) -> Job:
        job = Job(id=uuid.uuid4().hex[:16], target=target)
        self.jobs[job.id] = job
        self._tasks.spawn(self._resolve(job, resolve), f"preheat-{job.id}")
        return job

    async def _resolve(self, job: Job, resolve: Callable[[], Awaitable[list[Item]]]) -> None:
        try:
            job.items = await resolve()
            job.state = "running"
            log.info("preheat %s: %d blobs of %s", job.id, len(job.items), job.target)
        except (PreheatError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            self._fail(job, f"cannot resolve {job.target}: {e}")

    def _fail(self, job: Job, error: str) -> None:
        job.state, job.error, job.finished = "failed", error, time.time()
        log.warning("preheat %s failed: %s", job.id, error)

    async def refresh(self, job: Job, task_view: HolderView, seeds: set[str]) -> Job:
        """Bring a job's progress up to date from the store's piece maps."""
        if job.state != "running":
            return job
        if not seeds and time.time() - job.created > NO_SEED_SECONDS:
            self._fail(job, "no seed peer (naiad peer --seed) is registered")
            return job
        for item in job.items:
            view = await task_view(item.task_id)
            if view is None:
                continue
            item.pieces = view["pieces"]
            counts: dict[str, int] = {}
            for piece in view.get("piece_map", []):
                for holder in piece["holders"]:
                    if holder in seeds:
                        counts[holder] = counts.get(holder, 0) + 1
            item.pieces_held = max(counts.values(), default=0)
            item.held_by = sorted(s for s, n in counts.items() if n >= item.pieces)
        if all(i.held_by for i in job.items):
            job.state, job.finished = "done", time.time()
        return job

    async def close(self) -> None:
        await self._tasks.close()

"""Preheat: warm the seed peers with an image (or a URL) before anyone pulls it.

A job resolves the image's manifest through the registry API (a manifest list or index picks
linux/amd64), then every seed peer is handed each blob as work until some seed holds it whole;
the job is done when every blob is held, failed when resolution fails or no seed is there to
do it. The decision of what a seed should fetch is `work_for`, pure over the job and the
holders the store reports.

Preheat reaches only the scheduler's own `--allow-registry` list (none: preheat is refused),
and follows a registry's redirect only to a host on that list: the scheduler never connects
anywhere else, so a job can report nothing about other hosts (no port scanner). The book keeps
at most MAX_RUNNING jobs under way and the KEEP_FINISHED most recent finished ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp

from common import ids, oci
from common.registries import AllowList, Registry, UpstreamRefused
from common.tasks import TaskSet
from common.web import RequestError

log = logging.getLogger("naiad.scheduler.preheat")
NO_SEED_SECONDS = 30.0  # a job with no seed peer to run it fails after this
JOB_SECONDS = 3600.0  # a job not done after this fails (a seed that cannot fetch it)
MAX_RUNNING = 32  # jobs resolving or running at once; more are refused with 429
KEEP_FINISHED = 100  # finished jobs kept for /jobs, the oldest dropped first
MAX_REDIRECTS = 5
MAX_MANIFEST = 4 << 20
RESOLVE_SECONDS = 60.0
_REDIRECTS = (301, 302, 303, 307, 308)


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


def _allowed(allow: AllowList, host: str) -> Registry:
    try:
        return allow.registry_for_host(host)
    except UpstreamRefused as e:
        none = " (it has none: start the scheduler with --allow-registry URL)" \
            if not allow.hosts else ""
        raise RequestError(403, f"{e}{none}") from None


def image_target(reference: str, allow: AllowList) -> oci.ImageRef:
    """An image reference preheat may resolve, reached as its allow-list entry says (the entry's
    scheme, whatever the reference names: as on peers, nobody downgrades an https registry)."""
    try:
        ref = oci.parse_reference(reference)
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    registry = _allowed(allow, ref.host)
    return dataclasses.replace(ref, scheme=registry.scheme, host=registry.host)


def url_item(url: str, digest: str | None, allow: AllowList) -> Item:
    """A plain URL on an allow-listed host, with the scheme its entry gives."""
    try:
        registry = Registry.parse(f"{urlsplit(url).scheme}://{urlsplit(url).netloc}")
    except (UpstreamRefused, ValueError) as e:
        raise RequestError(400, f"not an http(s) URL: {url[:200]!r} ({e})") from None
    listed = _allowed(allow, registry.host)
    if listed.scheme != registry.scheme:
        raise RequestError(403, f"{registry.host} is allow-listed as {listed.base}: "
                                f"use {listed.scheme}://")
    return Item(task_id=ids.task_id_for_url(url), url=url, registry=listed.base, digest=digest)


Resolve = Callable[[], Awaitable[list[Item]]]


def image_resolver(reference: str, allow: AllowList) -> Resolve:
    ref = image_target(reference, allow)  # refused now, with a 4xx, not later in the job

    async def resolve() -> list[Item]:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=RESOLVE_SECONDS)) as s:
            return await resolve_image(s, ref, allow)
    return resolve


def url_resolver(url: str, digest: str | None, allow: AllowList) -> Resolve:
    item = url_item(url, digest, allow)

    async def resolve() -> list[Item]:
        return [item]
    return resolve


def check_redirect(target: str, allow: AllowList) -> None:
    """A redirect preheat may follow: to an allow-listed host, with its entry's scheme. The
    refusal names no host: job errors are shown to operators, and what a registry points at is
    not theirs to probe through the scheduler (the log has it)."""
    parts = urlsplit(target)
    try:
        registry = Registry.parse(f"{parts.scheme}://{parts.netloc}")
    except UpstreamRefused:
        registry = None
    if registry is not None and registry.host in allow \
            and allow.registry_for_host(registry.host).scheme == registry.scheme:
        return
    log.warning("preheat: a redirect to %r refused (not on --allow-registry)", target[:300])
    raise PreheatError("the registry redirected to a host not on this scheduler's "
                       "--allow-registry list; not followed")


async def fetch_manifest(session: aiohttp.ClientSession, url: str,
                         allow: AllowList) -> tuple[bytes, str]:
    """A manifest's bytes and media type, following allow-listed redirects only."""
    accept = {"Accept": ", ".join(oci.MANIFEST_TYPES)}
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(url, headers=accept, allow_redirects=False) as r:
            location = r.headers.get("Location")
            if r.status in _REDIRECTS and location:
                url = urljoin(url, location)
                check_redirect(url, allow)
                continue
            if r.status != 200:
                raise PreheatError(f"{url} answered {r.status}")
            document = await r.content.read(MAX_MANIFEST + 1)
            if len(document) > MAX_MANIFEST:
                raise PreheatError(f"{url}: a manifest larger than {MAX_MANIFEST} bytes")
            return document, r.headers.get("Content-Type", "")
    raise PreheatError(f"more than {MAX_REDIRECTS} redirects for {url}")


async def resolve_image(session: aiohttp.ClientSession, ref: oci.ImageRef,
                        allow: AllowList) -> list[Item]:
    """The config and layers of an image, as items for the seeds."""
    document, media_type = await fetch_manifest(session, ref.manifest_url(), allow)
    if oci.is_index(media_type, document):
        try:
            digest = oci.pick_platform(document)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise PreheatError(f"cannot read the index of {ref.repo}: {e!r}") from None
        if digest is None:
            raise PreheatError(f"{ref.repo}:{ref.reference} has no linux/amd64 manifest")
        document, _ = await fetch_manifest(session, ref.manifest_url(digest), allow)
    try:
        blobs = oci.manifest_blobs(document)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise PreheatError(f"cannot read the manifest of {ref.repo}: {e!r}") from None
    return [Item(task_id=b.digest, url=ref.blob_url(b.digest), registry=ref.registry,
                 digest=b.digest, size=b.size) for b in blobs]


def work_for(job: Job, seed_id: str) -> list[Item]:
    """What a seed should fetch: every item of a running job that no seed holds whole yet."""
    if job.state != "running":
        return []
    return [i for i in job.items if not i.held_by]


HolderView = Callable[[str], Awaitable[dict | None]]  # task id -> the store's task view


class JobBook:
    """Preheat jobs of this scheduler process: at most `max_running` under way, and the
    `keep_finished` most recently finished."""

    def __init__(self, max_running: int = MAX_RUNNING, keep_finished: int = KEEP_FINISHED,
                 clock: Callable[[], float] = time.time) -> None:
        self.jobs: dict[str, Job] = {}
        self.max_running = max_running
        self.keep_finished = keep_finished
        self._clock = clock
        self._tasks = TaskSet("preheat")

    def create(self, target: str, resolve: Resolve) -> Job:
        self._expire()
        running = sum(1 for j in self.jobs.values() if j.finished is None)
        if running >= self.max_running:
            raise RequestError(429, f"{running} preheat jobs are under way, the most this "
                                    f"scheduler runs at once: start this one when one is done")
        job = Job(id=uuid.uuid4().hex[:16], target=target, created=self._clock())
        self.jobs[job.id] = job
        self._tasks.spawn(self._resolve(job, resolve), f"preheat-{job.id}")
        return job

    async def _resolve(self, job: Job, resolve: Resolve) -> None:
        try:
            items = await resolve()
        except (PreheatError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            if job.finished is None:
                self._fail(job, f"cannot resolve {job.target}: {e}")
            return
        if job.finished is None:  # not failed meanwhile (JOB_SECONDS)
            job.items, job.state = items, "running"
            log.info("preheat %s: %d blobs of %s", job.id, len(job.items), job.target)

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state, job.error, job.finished = state, error, self._clock()
        finished = sorted((j for j in self.jobs.values() if j.finished is not None),
                          key=lambda j: j.finished or 0.0)
        for old in finished[:max(0, len(finished) - self.keep_finished)]:
            del self.jobs[old.id]

    def _fail(self, job: Job, error: str) -> None:
        self._finish(job, "failed", error)
        log.warning("preheat %s failed: %s", job.id, error)

    def _expire(self) -> None:
        deadline = self._clock() - JOB_SECONDS
        for job in list(self.jobs.values()):
            if job.finished is None and job.created < deadline:
                self._fail(job, f"not done after {JOB_SECONDS:.0f} s")

    async def refresh(self, job: Job, task_view: HolderView, seeds: set[str]) -> Job:
        """Bring a job's progress up to date from the store's piece maps."""
        if job.state == "running" and job.created < self._clock() - JOB_SECONDS:
            self._fail(job, f"not done after {JOB_SECONDS:.0f} s")
        if job.state != "running":
            return job
        if not seeds and self._clock() - job.created > NO_SEED_SECONDS:
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
            self._finish(job, "done")
        return job

    async def close(self) -> None:
        await self._tasks.close()

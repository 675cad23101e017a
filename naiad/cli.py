"""The `naiad` command: scheduler, peer, get, status, demo, containerd-config."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aiohttp

from common import auth
from common import log as logsetup
from common.config import ConfigError, Option, add_options, resolve, startup, writable_dir
from common.limits import raise_open_files_limit
from common.pieces import valid_piece_size
from common.registries import Registry, UpstreamRefused
from common.sizes import format_size, parse_size
from common.web import ClientLimits, is_loopback, split_listen
from naiad import containerd

log = logging.getLogger("naiad")
GC_YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections (default 700)
# Seconds a daemon drains for on each signal; a supervisor's grace period must outlast SIGTERM's
# (deploy/kubernetes: terminationGracePeriodSeconds).
DRAIN_SECONDS = {signal.SIGTERM: 10.0, signal.SIGINT: 2.0}


def _size_or_none(text: str) -> int | None:
    return parse_size(text) if text else None


def _piece_size(text: str) -> int | None:
    size = _size_or_none(text)
    if size is not None and not valid_piece_size(size):
        raise ValueError(f"a piece size is a power of two from 64 KiB to 64 MiB, got {text}")
    return size


def _address(text: str) -> str:
    """HOST:PORT, checked here so a typo is one line at start-up, not a traceback."""
    _, port = split_listen(text.removeprefix("https://"))  # --advertise may say https://
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return text


def _udp_address(text: str) -> str:
    return text if text == "off" else _address(text)


def _choice(*values: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text.lower() not in values:
            raise ValueError(f"expected {' or '.join(values)}, got {text!r}")
        return text.lower()
    return check


def _url(*schemes: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        parts = urlsplit(text)
        local = parts.scheme == "unix" and parts.path  # unix:///run/redis.sock
        if parts.scheme not in schemes or not (parts.hostname or local):
            raise ValueError(f"not a {'/'.join(schemes)} URL: {text!r}")
        return text
    return check


def _int_or_none(text: str) -> int | None:
    return int(text) if text else None


COMMON = [
    Option("cluster_secret", None, "shared secret peers and schedulers sign requests with"),
    Option("cluster_secret_file", None, "file holding the cluster secret", metavar="FILE"),
    Option("insecure", False, "run without a cluster secret unless one is given: requests "
           "unsigned, a non-loopback listener allowed", switch=True),
    Option("tls_cert", None, "certificate (PEM) to serve HTTPS with on --listen (a peer: on "
           "--upload too, and its client certificate to other peers)", metavar="FILE"),
    Option("tls_key", None, "private key (PEM) of --tls-cert", metavar="FILE"),
    Option("header_timeout", 10.0, "seconds a client has to send its request headers, from "
           "connecting or from its previous response (idle keep-alive ends there too)",
           type=float, metavar="SECONDS", above=0),
    Option("connections_per_address", 512, "connections one remote address may hold on each "
           "listener; more are closed at once", type=int, metavar="N", at_least=1),
    Option("log_format", "text", "text or json", type=_choice("text", "json")),
    Option("log_level", "info", "debug, info, warning or error",
           type=_choice("debug", "info", "warning", "error")),
]
SCHEDULER_OPTIONS = [
    Option("listen", "127.0.0.1:8002", "HTTP API address", type=_address, metavar="HOST:PORT"),
    Option("udp", "127.0.0.1:8003", "UDP heartbeat address; `off`: heartbeats over HTTP only",
           type=_udp_address, metavar="HOST:PORT"),
    Option("udp_advertise", None, "UDP address peers send heartbeats to, if not --udp",
           type=_address, metavar="HOST:PORT"),
    Option("token", None, "bearer token required by mutating operator calls; a --listen "
           "beyond loopback needs one (or --insecure)"),
    Option("allow_registry", [], "registry preheat may reach (repeatable, as a peer's "
           "--allow-registry); none: preheat is refused", repeat=True, metavar="URL"),
    Option("heartbeat_interval", 2.0, "seconds between peer heartbeats; 3 missed expire a peer",
           type=float, metavar="SECONDS", above=0),
    Option("lease_timeout", 2.0, "seconds without progress before an origin lease is taken over "
           "(0.75 once a child reported its holder)",
           type=float, metavar="SECONDS", above=0),
    Option("redis", None, "Redis URL for state shared by scheduler replicas",
           type=_url("redis", "rediss", "unix"), metavar="URL"),
    Option("redis_cluster", None, "a seed node of a Redis Cluster for state shared by "
           "scheduler replicas (instead of --redis)", type=_url("redis", "rediss"),
           metavar="URL"),
    Option("no_framed_calls", False, "answer peers over HTTP only, as a scheduler from before "
           "framed calls (peers' persistent connections on --listen) did", switch=True),
    *COMMON,
]
PEER_OPTIONS = [
    Option("scheduler", ["http://127.0.0.1:8002"], "scheduler URL; repeat to fail over in order",
           type=_url("http", "https"), repeat=True, metavar="URL"),
    Option("listen", "127.0.0.1:65001", "mirror/proxy address", type=_address,
           metavar="HOST:PORT"),
    Option("upload", "127.0.0.1:65002", "peer-to-peer upload address", type=_address,
           metavar="HOST:PORT"),
    Option("advertise", None, "upload address other peers dial, if not --upload",
           type=_address, metavar="HOST:PORT"),
    Option("data_dir", "~/.local/share/naiad", "chunk store directory", metavar="DIR"),
    Option("registry", "https://registry-1.docker.io", "default upstream registry", metavar="URL"),
    Option("hub", "https://huggingface.co", "model hub (Hugging Face) reached with "
           "HF_ENDPOINT=<this peer>: its LFS files peer-to-peer, the rest passed through",
           metavar="URL"),
    Option("allow_registry", [], "another registry reachable through this peer (repeatable)",
           repeat=True, metavar="URL"),
    Option("id", None, "peer id (default: the hostname)"),
    Option("idc", "", "IDC label"),
    Option("location", "", "location label, most general first: a|b|c"),
    Option("seed", False, "seed peer (fetches preheated content)", switch=True),
    Option("piece_size", None, "piece size proposed for new tasks", type=_piece_size,
           metavar="SIZE"),
    Option("upload_slots", 8, "concurrent uploads to other peers", type=int, metavar="N",
           at_least=1),
    Option("upload_slots_per_address", None, "concurrent uploads to one remote address "
           "(default: half of --upload-slots, at least 1)", type=_int_or_none, metavar="N",
           at_least=1),
    Option("upload_min_rate", 64 << 10, "bytes/s a child must read an upload at; one slower "
           "for about 5 s is cut off and its slot freed (0: never)", type=parse_size,
           metavar="SIZE"),
    Option("tls_ca", None, "CA certificates (PEM) other peers' https upload ports are verified "
           "against (default: the system store); with --tls-cert, the upload port also "
           "requires client certificates it signed (mutual TLS)", metavar="FILE"),
    Option("origin_concurrency", 4, "concurrent origin requests per registry", type=int,
           metavar="N", at_least=1),
    Option("no_verify_on_serve", False, "do not re-hash stored chunks served to clients",
           switch=True),
    Option("no_prefetch", False, "do not fetch the rest of a blob in the background after a "
           "range read", switch=True),
    Option("disk_quota", None, "most bytes the chunk store may hold; least recently used "
           "tasks are evicted above 95%, down to 85%", type=_size_or_none, metavar="SIZE",
           above=0),
    Option("scrub_rate", 16 << 20, "bytes/s at which stored chunks are re-hashed in the "
           "background (0: never)", type=parse_size, metavar="SIZE"),
    Option("upload_rate", None, "most bytes/s uploaded to other peers (unlimited if unset)",
           type=_size_or_none, metavar="SIZE", above=0),
    Option("download_rate", None, "most bytes/s downloaded from other peers",
           type=_size_or_none, metavar="SIZE", above=0),
    Option("origin_rate", None, "most bytes/s downloaded from origin registries",
           type=_size_or_none, metavar="SIZE", above=0),
    *COMMON,
]


def _secret(opts: dict[str, Any], *listens: str) -> bytes | None:
    """--cluster-secret(-file); with neither, the per-user secret the first daemon generates
    (one host, no flags). That one never reaches another host, so a non-loopback listener
    needs a secret given, or --insecure, which runs unsigned."""
    try:
        given = auth.load_secret(opts["cluster_secret"], opts["cluster_secret_file"])
        if given is not None or opts["insecure"]:
            return given
        exposed = [a for a in listens if not is_loopback(split_listen(a)[0])]
        if exposed:
            raise ConfigError(f"{', '.join(exposed)} is not loopback: set --cluster-secret or "
                              "--cluster-secret-file (or --insecure to run without one)")
        return auth.user_secret()
    except auth.SecretError as e:
        raise ConfigError(str(e)) from None


def _tls(opts: dict[str, Any]) -> ssl.SSLContext | None:
    """The server TLS context of --tls-cert and --tls-key (both or neither)."""
    cert, key = opts["tls_cert"], opts["tls_key"]
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load --tls-cert {cert} / --tls-key {key}: {e}") from None
    return context


def _upload_tls(opts: dict[str, Any]) -> ssl.SSLContext | None:
    """The upload port's server context: that of --tls-cert, asking for and verifying client
    certificates against --tls-ca when it is given."""
    context = _tls(opts)
    if context is not None and opts["tls_ca"]:
        _load_ca(context, opts["tls_ca"])
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _peer_tls(opts: dict[str, Any]) -> ssl.SSLContext:
    """How this peer dials https parents: their certificate verified against --tls-ca only
    (else the system store), presenting --tls-cert as its client certificate when it has one."""
    context = _load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), opts["tls_ca"]) \
        if opts["tls_ca"] else ssl.create_default_context()
    if opts["tls_cert"] and opts["tls_key"]:
        context.load_cert_chain(opts["tls_cert"], opts["tls_key"])  # checked by _tls already
    return context


def _load_ca(context: ssl.SSLContext, ca: str) -> ssl.SSLContext:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load --tls-ca {ca}: {e}") from None
    return context


def _require_token(opts: dict[str, Any]) -> None:
    """Operator calls reach cordon and preheat: beyond loopback they need a token."""
    if not is_loopback(split_listen(opts["listen"])[0]) and not opts["token"] \
            and not opts["insecure"]:
        raise ConfigError(f"{opts['listen']} is not loopback: set --token (or --insecure to "
                          "run the operator API without one)")


def _allow_registries(opts: dict[str, Any]) -> list[Registry]:
    try:
        if "registry" in opts:  # a peer's default upstream
            Registry.parse(opts["registry"])
    except UpstreamRefused as e:
        raise ConfigError(f"--registry: {e}") from None
    try:
        if "hub" in opts:
            Registry.parse(opts["hub"])
    except UpstreamRefused as e:
        raise ConfigError(f"--hub: {e}") from None
    try:
        return [Registry.parse(u) for u in opts["allow_registry"]]
    except UpstreamRefused as e:
        raise ConfigError(f"--allow-registry: {e}") from None


def _client_limits(opts: dict[str, Any]) -> ClientLimits:
    return ClientLimits(header_timeout=opts["header_timeout"],
                        per_address=opts["connections_per_address"])


async def _serve(start: Callable[[], Any], stop: Callable[[float], Any]) -> None:
    """Run until SIGTERM (drain for up to 10 s) or SIGINT (drain for up to 2 s)."""
    raise_open_files_limit()  # a socket per client: the soft default is a few hundred
    loop = asyncio.get_running_loop()
    stopping: asyncio.Future[float] = loop.create_future()
    for sig, drain in DRAIN_SECONDS.items():
        loop.add_signal_handler(sig, lambda d=drain: stopping.done() or stopping.set_result(d))
    await start()
    # Everything built so far (modules, apps, sessions) lives as long as the process: keep it
    # out of every collection, and collect the young generation less often — the daemons
    # allocate many short-lived objects per piece; this cut a receiving peer's user CPU by
    # about a third (docs/benchmarks.md).
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    drain = await stopping
    log.info("stopping (drain %.0f s)", drain)
    await stop(drain)


def cmd_scheduler(opts: dict[str, Any]) -> int:
    from scheduler.server import SchedulerConfig, SchedulerService

    udp = None if opts["udp"] == "off" else opts["udp"]
    if opts["redis"] and opts["redis_cluster"]:
        raise ConfigError("--redis and --redis-cluster: give one, not both")
    secret = _secret(opts, opts["listen"], *([udp] if udp else []))
    _require_token(opts)
    service = SchedulerService(SchedulerConfig(
        listen=opts["listen"], udp=udp, udp_advertise=opts["udp_advertise"],
        heartbeat_interval=opts["heartbeat_interval"],
        lease_timeout=opts["lease_timeout"], token=opts["token"], secret=secret,
        redis=opts["redis"], redis_cluster=opts["redis_cluster"], tls=_tls(opts),
        allow_registries=_allow_registries(opts),
        limits=_client_limits(opts), framed=not opts["no_framed_calls"]))

    async def stop(_: float) -> None:
        await service.stop()

    asyncio.run(_serve(service.start, stop))
    return 0


def cmd_peer(opts: dict[str, Any]) -> int:
    from peer.daemon import PeerConfig, PeerDaemon

    secret = _secret(opts, opts["listen"], opts["upload"])
    _allow_registries(opts)  # one line, not a traceback, for a registry URL that is not http(s)
    daemon = PeerDaemon(PeerConfig(
        data_dir=opts["data_dir"], schedulers=opts["scheduler"], listen=opts["listen"],
        upload=opts["upload"], registry=opts["registry"], hub=opts["hub"],
        allow_registries=opts["allow_registry"], peer_id=opts["id"] or socket.gethostname(),
        idc=opts["idc"], location=opts["location"], seed=opts["seed"],
        advertise=opts["advertise"], piece_size=opts["piece_size"],
        upload_slots=opts["upload_slots"], origin_concurrency=opts["origin_concurrency"],
        upload_slots_per_address=opts["upload_slots_per_address"],
        upload_min_rate=opts["upload_min_rate"],
        verify_on_serve=not opts["no_verify_on_serve"], prefetch=not opts["no_prefetch"],
        disk_quota=opts["disk_quota"], scrub_rate=opts["scrub_rate"],
        upload_rate=opts["upload_rate"], download_rate=opts["download_rate"],
        origin_rate=opts["origin_rate"], secret=secret, tls=_tls(opts),
        upload_tls=_upload_tls(opts), peer_tls=_peer_tls(opts), limits=_client_limits(opts)))
    asyncio.run(_serve(daemon.start, daemon.stop))
    return 0


def _fetched(fetch: Coroutine[Any, Any, dict], error: type[Exception]) -> dict | None:
    """What a `naiad get` fetch returned, or None once its failure is printed (one line)."""
    try:
        return asyncio.run(fetch)
    except (error, aiohttp.ClientError, OSError) as e:
        print(f"naiad get: {e}", file=sys.stderr)
        return None


def cmd_get(args: argparse.Namespace) -> int:
    from naiad.get import GetError, check_args, check_hub_args, get, get_hub

    if args.url.startswith("hf://"):
        ref = check_hub_args(args.url, args.output, args.peer, args.revision)
        done = _fetched(get_hub(ref, args.output, args.peer, args.revision,
                                os.environ.get("HF_TOKEN") or None), GetError)
        if done is None:
            return 1
        print(f"{args.output}: {done['files']} files, {format_size(int(done['bytes']))} at "
              f"{done['commit']} (source: {done['source']})", file=sys.stderr)
        return 0
    if args.revision != "main":
        raise ConfigError("--revision is for hf:// URLs")
    check_args(args.url, args.output, args.peer, args.digest)
    result = _fetched(get(args.url, args.output, args.peer, args.digest), GetError)
    if result is None:
        return 1
    print(f"{args.output}: {format_size(int(result['bytes']))} {result['digest']} "
          f"(source: {result['source']})", file=sys.stderr)
    return 0


class _Operator:
    """`naiad status` and `naiad preheat` as an operator: the token when given, and a signature
    with --cluster-secret-file (or $NAIAD_CLUSTER_SECRET) or, for a scheduler on this host, the
    per-user secret the daemons share — so both work with no flags on one host."""

    def __init__(self, args: argparse.Namespace) -> None:
        try:
            self.base = _url("http", "https")(args.scheduler).rstrip("/")
        except ValueError as e:
            raise ConfigError(f"--scheduler: {e}") from None
        self.token = args.token
        self.guessed = False  # the per-user secret: perhaps not the one this scheduler has
        try:
            self.secret = auth.load_secret(os.environ.get("NAIAD_CLUSTER_SECRET"),
                                           args.cluster_secret_file)
            if self.secret is None and is_loopback(urlsplit(self.base).hostname or ""):
                self.secret = auth.user_secret(create=False)
                self.guessed = self.secret is not None
        except auth.SecretError as e:
            raise ConfigError(str(e)) from None

    async def call(self, s: aiohttp.ClientSession, method: str, path: str,
                   body: dict | None = None) -> tuple[int, dict]:
        """(status, JSON reply) of one call, signed afresh (every signature is good once). A
        read the guessed secret got refused is read again unsigned: the summary views."""
        status, reply = await self._once(s, method, path, body)
        if status == 401 and self.guessed and method == "GET":
            self.secret = None
            status, reply = await self._once(s, method, path, body)
        return status, reply

    async def _once(self, s: aiohttp.ClientSession, method: str, path: str,
                    body: dict | None) -> tuple[int, dict]:
        url = self.base + path
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.secret is not None:
            headers[auth.HEADER] = auth.sign(self.secret, method, urlsplit(url).path, data)
        async with s.request(method, url, data=data or None, headers=headers) as r:
            try:
                reply = await r.json(content_type=None)
            except ValueError:
                reply = None
            if not isinstance(reply, dict):
                reply = {"error": f"HTTP {r.status}, not a JSON object"}
            return r.status, reply


def cmd_preheat(args: argparse.Namespace) -> int:
    """Start a preheat job; wait until every blob is on a seed peer (exit 0) or it fails."""
    body: dict[str, str] = {"url": args.ref} if args.url else {"image": args.ref}
    if args.digest:
        body["digest"] = args.digest
    op = _Operator(args)

    async def run() -> int:
        async with aiohttp.ClientSession() as s:
            status, job = await op.call(s, "POST", "/api/v1/preheat", body)
            if status >= 400:
                print(f"naiad preheat: {job.get('error', status)}", file=sys.stderr)
                return 1
            if args.no_wait:
                print(job["id"])
                return 0
            deadline = asyncio.get_running_loop().time() + args.timeout
            while job["state"] in ("resolving", "running"):
                if asyncio.get_running_loop().time() > deadline:
                    print(f"naiad preheat: job {job['id']} not done after {args.timeout} s",
                          file=sys.stderr)
                    return 2
                await asyncio.sleep(0.5)
                status, job = await op.call(s, "GET", f"/api/v1/jobs/{job['id']}")
                if status >= 400:
                    print(f"naiad preheat: {job.get('error', status)}", file=sys.stderr)
                    return 1
                if sys.stderr.isatty():
                    sys.stderr.write(f"\r{job['state']} {100 * job['progress']:5.1f}%")
            if job["state"] != "done":
                print(f"naiad preheat: job {job['id']} {job['state']}: {job.get('error')}",
                      file=sys.stderr)
                return 1
            held = sum(i["size"] or 0 for i in job["items"])
            print(f"job {job['id']} done: {len(job['items'])} blobs, {format_size(held)} on "
                  f"{', '.join(sorted({s for i in job['items'] for s in i['held_by']}))}")
            return 0

    try:
        return asyncio.run(run())
    except (aiohttp.ClientError, OSError) as e:
        print(f"naiad preheat: scheduler {args.scheduler} unreachable: {e}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    op = _Operator(args)

    async def fetch() -> tuple[dict, dict] | str:
        async with aiohttp.ClientSession() as s:
            replies = [await op.call(s, "GET", path) for path in ("/api/v1/stats",
                                                                  "/api/v1/peers")]
        for status, reply in replies:
            if status != 200:
                return f"scheduler {args.scheduler} answered {status}: {reply.get('error')}"
        return replies[0][1], replies[1][1]

    try:
        result = asyncio.run(fetch())
    except (aiohttp.ClientError, OSError) as e:
        print(f"naiad status: scheduler {args.scheduler} unreachable: {e}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        print(f"naiad status: {result}", file=sys.stderr)
        return 1
    stats, peers = result
    if args.json:
        print(json.dumps({"stats": stats, **peers}, indent=2))
        return 0
    b = stats["bytes"]
    print(f"peers {stats['peers']}   tasks {stats['tasks']}   "
          f"saving {100 * stats['savings_ratio']:.1f}%")
    print(f"bytes obtained: origin {format_size(b['origin'])}, peers {format_size(b['peer'])}, "
          f"local {format_size(b['local'])}; served {format_size(stats['served_bytes'])}")
    for p in peers["peers"]:
        flags = " ".join(f for f, on in (("seed", p["seed"]), ("cordoned", p["cordoned"]),
                                         ("penalised", p["penalised"])) if on)
        # No upload address without a signature or the token (the scheduler keeps it back).
        print(f"  {p['id']:<24} {p.get('upload_addr', '-'):<22} "
              f"uploads {p['load']['active_uploads']:>3}"
              f"  heartbeat {p['last_heartbeat_age']:.1f}s ago {flags}")
    return 0


def cmd_check_store(args: argparse.Namespace) -> int:
    """Re-hash every chunk of a (stopped) peer's store; drop what fails."""
    from peer.store import CannotStore, ChunkStore

    what = f"--data-dir {args.data_dir}"
    root = Path(args.data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{what}: " + ("not a directory" if root.exists()
                                         else "no such directory"))
    if not (root / "index.db").is_file() and not (root / "chunks").is_dir():
        # Opening would make a store of it: never in a directory the user merely mistyped.
        raise ConfigError(f"{what}: not a peer's store (no index.db or chunks/ in it)")
    store = ChunkStore(root)
    try:
        with startup(what):
            writable_dir(root)  # it drops what fails
            store.open()  # the cheap check: missing or torn files, orphans
        before = sum(len(t.pieces) for t in store.tasks())
        dropped = store.check(full=True)
    except CannotStore as e:  # found bad chunks but could not drop them (full, read-only)
        raise ConfigError(f"{what}: {e}") from None
    finally:
        store.close()
    print(f"{args.data_dir}: {before} pieces checked, {dropped} dropped")
    return 1 if dropped else 0


def cmd_containerd_config(args: argparse.Namespace) -> int:
    """hosts.toml for each --registry under --dir, pointing containerd at the node's peer."""
    try:
        files = containerd.plan(args.registry or [], args.peer)
    except containerd.BadOption as e:
        raise ConfigError(str(e)) from None
    root = Path(args.dir)
    with startup(f"--dir {args.dir}"):
        for host, text in files.items():
            path = root / host / containerd.FILE
            print(f"{path}: {'written' if containerd.write(path, text) else 'unchanged'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from naiad.demo import MAX_PEERS, run_demo

    if not 1 <= args.peers <= MAX_PEERS:
        raise ConfigError(f"--peers must be from 1 to {MAX_PEERS}, got {args.peers}")
    return asyncio.run(run_demo(peers=args.peers))


def _operator_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", default=os.environ.get("NAIAD_TOKEN"),
                   help="operator token (default: $NAIAD_TOKEN)")
    p.add_argument("--cluster-secret-file", default=os.environ.get("NAIAD_CLUSTER_SECRET_FILE"),
                   metavar="FILE", help="sign with this cluster secret (default: "
                   "$NAIAD_CLUSTER_SECRET(_FILE), else for a scheduler on this host the "
                   "per-user secret)")


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other start-up mistake (not the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="naiad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("scheduler", help="run the scheduler")
    add_options(p, SCHEDULER_OPTIONS)
    p = sub.add_parser("peer", help="run a peer daemon")
    add_options(p, PEER_OPTIONS)
    p = sub.add_parser("get", help="fetch one blob or file, or a model hub repository, "
                       "through a peer")
    p.add_argument("url", help="a registry blob URL, any http(s) URL, or "
                   "hf://[datasets/|spaces/]owner/repo[/path] (the peer's --hub; token from "
                   "$HF_TOKEN)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the file; for hf:// "
                   "a directory, written as a plain tree: DIR/<path in the repository>")
    p.add_argument("--peer", default="http://127.0.0.1:65001", metavar="URL")
    p.add_argument("--digest", default=None, metavar="sha256:HEX")
    p.add_argument("--revision", default="main", metavar="REV",
                   help="hf:// only: branch, tag or commit (default: main)")
    p = sub.add_parser("preheat", help="warm the seed peers with an image or a URL")
    p.add_argument("ref", help="host/repo:tag, http://host:port/repo:tag, or a URL with --url")
    p.add_argument("--url", action="store_true", help="REF is a plain URL, not an image")
    p.add_argument("--digest", default=None, metavar="sha256:HEX",
                   help="with --url: the file's digest")
    p.add_argument("--scheduler", default="http://127.0.0.1:8002", metavar="URL")
    _operator_options(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and exit")
    p.add_argument("--timeout", type=float, default=3600, metavar="SECONDS")
    p = sub.add_parser("status", help="cluster summary")
    p.add_argument("--scheduler", default="http://127.0.0.1:8002", metavar="URL")
    _operator_options(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p = sub.add_parser("check-store", help="re-hash every chunk of a stopped peer's store, "
                       "dropping those that fail (exit 1 if any did)")
    p.add_argument("--data-dir", default="~/.local/share/naiad", metavar="DIR")
    p = sub.add_parser("containerd-config", help="write containerd's hosts.toml for each "
                       "registry, pointing at this node's peer (idempotent)")
    p.add_argument("--registry", action="append", metavar="REGISTRY", help="host[:port] (https) "
                   "or http(s)://host[:port]; repeatable; docker.io covers its aliases")
    p.add_argument("--peer", default=containerd.DEFAULT_PEER, metavar="URL",
                   help="the node's peer mirror (default: %(default)s)")
    p.add_argument("--dir", default=containerd.DEFAULT_DIR, metavar="DIR",
                   help="containerd's config_path (default: %(default)s)")
    p = sub.add_parser("demo", help="a whole cluster on loopback, and what it saved")
    p.add_argument("--peers", type=int, default=4, metavar="N")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # named by the command they were given to, not by `naiad`
        print(f"naiad {args.command}: unrecognized arguments: {' '.join(extra)} (see naiad "
              f"{args.command} --help)", file=sys.stderr)
        return 2
    try:
        if args.command in ("scheduler", "peer"):
            commands = {"scheduler": SCHEDULER_OPTIONS, "peer": PEER_OPTIONS}
            opts = resolve(commands[args.command], args, args.command, commands=commands)
            logsetup.setup(opts["log_format"], opts["log_level"].upper())
            return (cmd_scheduler if args.command == "scheduler" else cmd_peer)(opts)
        logsetup.setup("text", "WARNING")
        return {"get": cmd_get, "status": cmd_status, "demo": cmd_demo, "preheat": cmd_preheat,
                "check-store": cmd_check_store,
                "containerd-config": cmd_containerd_config}[args.command](args)
    except ConfigError as e:
        print(f"naiad {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


def config_reference() -> str:
    """docs/config.md, generated from the option tables so it cannot drift from them."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -c 'from naiad.cli import config_reference as c; "
        "print(c(), end=\"\")' > docs/config.md`; tests/test_docs.py checks it is current. -->",
        "",
        "Every option is read, in order of precedence, from the command line (`--name`), the",
        "environment (`NAIAD_NAME`), a TOML file given with `--config FILE` (or",
        "`NAIAD_CONFIG`), at top level or in the command's own table (`[peer]`,",
        "`[scheduler]`), then the default. Repeatable options take a list in TOML and a",
        "comma-separated list in the environment. Sizes accept `k`, `M`, `G` suffixes (powers",
        "of 1024).",
        "",
        "```toml",
        "# /etc/naiad.toml",
        "cluster-secret-file = \"/etc/naiad/secret\"",
        "[peer]",
        "scheduler = [\"http://sched-a:8002\", \"http://sched-b:8002\"]",
        "allow-registry = [\"http://registry.internal:5000\"]",
        "idc = \"eu-1\"",
        "```",
    ]
    for command, options in (("scheduler", SCHEDULER_OPTIONS), ("peer", PEER_OPTIONS)):
        lines += ["", f"## naiad {command}", "", "| option | environment | default | meaning |",
                  "|---|---|---|---|"]
        for o in options:
            flag = o.flag if o.switch else f"{o.flag} {o.metavar or o.name.upper()}"
            default = "" if o.default in (None, [], False) else f"`{o.default}`"
            more = " (repeatable)" if o.repeat else ""
            lines.append(f"| `{flag}` | `{o.env}` | {default} | {o.help}{more} |")
    return "\n".join(lines) + "\n"

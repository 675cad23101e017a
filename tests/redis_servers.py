"""Real Redis servers on loopback for the tests: one instance (`RedisServer`), or a Redis
Cluster of three masters with a replica each (`RedisCluster`). No persistence: a cluster node
keeps only its cluster config file, in its own tmp dir."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.cluster import Proc, free_port, spawn


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return path


def _poll(ready: Callable[[], bool], seconds: float, what: str, proc: Proc) -> None:
    """Until `ready()` (a readiness check: returns on the first yes), bounded."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{proc.logs()}")
        try:
            if ready():
                return
        except (redis.ConnectionError, redis.ResponseError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}:\n{proc.logs()}")
        time.sleep(0.02)


class RedisServer:
    """A real redis-server on a loopback port, without persistence."""

    def __init__(self, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        binary = _binary("redis-server")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.binary = binary
        self.args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", *extra]
        self.proc: Proc = spawn(f"redis-{self.port}", [binary, *self.args], workdir)

    def wait_ready(self, seconds: float = 10.0) -> None:
        """Until it answers PING."""
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            _poll(client.ping, seconds, "redis-server not ready", self.proc)
        finally:
            client.close()

    def stop(self) -> None:
        self.proc.stop()


class RedisCluster:
    """Six cluster-enabled redis-servers joined by `redis-cli --cluster create` into three
    masters with one replica each. A failed master's replica takes over after
    `node_timeout_ms` (kept short, so a failover test stays fast)."""

    def __init__(self, workdir: Path, nodes: int = 6, node_timeout_ms: int = 1000) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(nodes):
            d = workdir / f"node{i}"
            d.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(d, (
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(node_timeout_ms),
                # A replica takes over however long since it last heard its master (a quiet
                # test cluster's replicas hear theirs only every ping period).
                "--cluster-replica-validity-factor", "0", "--repl-ping-replica-period", "1",
                "--repl-diskless-sync-delay", "0")))
        self.url = f"redis://127.0.0.1:{self.nodes[0].port}"

    def create(self, seconds: float = 30.0) -> None:
        """Start-up: every node answering, the cluster created, `cluster_state:ok` seen from
        every node (each must know every slot's master before a test uses it) and every
        replica in sync with its master (else a failover loses what was written until then)."""
        for node in self.nodes:
            node.wait_ready()
        subprocess.run([_binary("redis-cli"), "--cluster", "create",
                        *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=seconds)
        for node in self.nodes:
            self.wait_ok(node, seconds)
        for node in self.nodes:
            self.wait_replicated(node, seconds)

    def wait_ok(self, node: RedisServer, seconds: float = 30.0) -> None:
        client = redis.Redis(port=node.port, socket_timeout=1, decode_responses=True)
        try:
            _poll(lambda: client.cluster("info")["cluster_state"] == "ok", seconds,
                  "redis cluster not ok", node.proc)
        finally:
            client.close()

    def wait_replicated(self, node: RedisServer, seconds: float = 30.0) -> None:
        """Until a master's replicas are all online (a replica: at once)."""
        client = redis.Redis(port=node.port, socket_timeout=1, decode_responses=True)

        def synced() -> bool:
            info = client.info("replication")
            if info["role"] != "master":
                return True
            replicas = [v for k, v in info.items() if k.startswith("slave")
                        and isinstance(v, dict)]
            return bool(replicas) and all(r["state"] == "online" for r in replicas)
        try:
            _poll(synced, seconds, "redis cluster replicas not in sync", node.proc)
        finally:
            client.close()

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc.popen.poll() is None]

    def master_of(self, key: str) -> RedisServer:
        """The node serving `key`'s slot now."""
        client = redis.Redis(port=self.alive()[0].port, socket_timeout=1,
                             decode_responses=True)
        try:
            slot = client.cluster("keyslot", key)
            for start, end, master, *_ in client.cluster("slots"):
                if start <= slot <= end:
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        finally:
            client.close()
        raise LookupError(f"no master serves {key}")

    async def flush(self) -> None:
        """Empty every master (replicas follow)."""
        client = aioredis.RedisCluster.from_url(self.url)
        try:
            await client.flushall(target_nodes=aioredis.RedisCluster.PRIMARIES)
        finally:
            await client.aclose()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# Fixtures: import them into a test module to use them (one of each per module).

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.stop()

"""Real OCI images for the real-client tests: gzipped tar layers that unpack, a config whose
diff_ids match, an OCI manifest, pushed to a registry over its HTTP API."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

import aiohttp

from tests.cluster import push_blob

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Image:
    repo: str
    tag: str
    manifest: bytes
    manifest_digest: str
    config_digest: str
    layers: list[tuple[str, int]]  # (digest, size)

    @property
    def layer_bytes(self) -> int:
        return sum(size for _, size in self.layers)


def _layer(index: int, size: int) -> tuple[bytes, str]:
    """A gzipped tar holding one file of random (incompressible) bytes; and its diff_id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/layer{index}.bin")
        info.size = size
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), \
        "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


async def push_image(registry_url: str, repo: str, tag: str, layer_sizes: list[int],
                     headers: dict[str, str] | None = None) -> Image:
    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        blob, diff_id = _layer(i, size)
        layers.append((await push_blob(registry_url, repo, blob, headers), len(blob)))
        diff_ids.append(diff_id)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }).encode()
    config_digest = await push_blob(registry_url, repo, config, headers)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": d, "size": s} for d, s in layers],
    }).encode()
    async with aiohttp.ClientSession(headers=headers or {}) as s, s.put(
            f"{registry_url}/v2/{repo}/manifests/{tag}", data=manifest,
            headers={"Content-Type": MANIFEST}) as r:
        assert r.status == 201, await r.text()
    return Image(repo, tag, manifest, "sha256:" + hashlib.sha256(manifest).hexdigest(),
                 config_digest, layers)

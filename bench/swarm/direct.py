"""Baseline (a): every peer namespace's client pulls straight from the registry at once."""

from __future__ import annotations

from bench.swarm.clients import Trial, measure_pull
from bench.swarm.report import Result


async def run(trial: Trial) -> Result:
    url = trial.registry_url + trial.blob.url_path
    return await measure_pull(trial, "direct", {host: url for host in trial.lab.peers})

"""Deployment files run what the code really accepts: one way to read a naiad container's
command line, shared by the compose test and the Kubernetes test."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.config import resolve
from naiad import cli

DAEMONS = {"scheduler": cli.SCHEDULER_OPTIONS, "peer": cli.PEER_OPTIONS}


def parse_naiad(argv: list[str], environ: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """(command, options) of `naiad ARGV` run with `environ` (the container's, nothing of this
    process's), through the real parser; a daemon's options resolved as it resolves them
    (flags, `NAIAD_*`, defaults) and passed through its start-up checks, which raise where it
    would refuse to start (a listener beyond loopback without a secret, a scheduler without
    its token, a registry URL that is not http(s))."""
    args = cli.build_parser().parse_args(argv)
    if args.command not in DAEMONS:
        return args.command, vars(args)
    opts = resolve(DAEMONS[args.command], args, args.command, environ=environ)
    if args.command == "scheduler":
        udp = [] if opts["udp"] == "off" else [opts["udp"]]
        cli._secret(opts, opts["listen"], *udp)
        cli._require_token(opts)
    else:
        cli._secret(opts, opts["listen"], opts["upload"])
    cli._allow_registries(opts)
    return args.command, opts

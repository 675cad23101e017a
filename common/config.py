"""Options: declared once, read from flags, `NAIAD_<OPTION>` environment variables and a TOML
file (`--config`), in that order of precedence, then the declared default.

An option named `heartbeat_interval` is `--heartbeat-interval` on the command line,
`NAIAD_HEARTBEAT_INTERVAL` in the environment and `heartbeat-interval` (or
`heartbeat_interval`) in the file, at top level or in the command's own table (`[peer]`).
Repeatable options take a list in TOML and a comma-separated list in the environment.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    repeat: bool = False
    switch: bool = False  # a flag without a value
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "NAIAD_" + self.name.upper()


class ConfigError(ValueError):
    pass


def add_options(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML file with options (flags and NAIAD_* variables win)")
    for opt in options:
        default_text = "" if opt.default in (None, [], False) else f" (default: {opt.default})"
        kwargs: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS,
                                  "help": opt.help + default_text}
        if opt.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = opt.metavar or opt.name.upper().replace("_", "-")
            if opt.repeat:
                kwargs["action"] = "append"
        parser.add_argument(opt.flag, **kwargs)


def _truthy(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(opt: Option, raw: Any, origin: str) -> Any:
    try:
        if opt.switch:
            return raw if isinstance(raw, bool) else _truthy(str(raw))
        if opt.repeat:
            items = raw if isinstance(raw, list) else [s for s in str(raw).split(",")
                                                       if s.strip()]
            return [opt.type(str(i).strip()) for i in items]
        if isinstance(raw, list | dict):
            raise TypeError(f"expected one value, got {type(raw).__name__}")
        return opt.type(raw if isinstance(raw, str) else str(raw))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{opt.name} from {origin}: {e}") from None


def resolve(options: list[Option], args: argparse.Namespace, section: str,
            environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The value of every option, from flags, environment, file and defaults in that order."""
    environ = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get("NAIAD_CONFIG")
    if config_path:
        try:
            data = tomllib.loads(Path(config_path).expanduser().read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {config_path}: {e}") from None
        known = {o.name for o in options}
        table = data.get(section, {})
        table = table if isinstance(table, dict) else {}
        # Top-level keys may belong to other commands sharing the file; the command's own
        # table may only hold its own options.
        for key, value in data.items():
            if not isinstance(value, dict) and key.replace("-", "_") in known:
                file_values[key.replace("-", "_")] = value
        unknown = sorted(k for k in table if k.replace("-", "_") not in known)
        if unknown:
            raise ConfigError(f"unknown option(s) in [{section}] of {config_path}: "
                              f"{', '.join(unknown)}")
        for key, value in table.items():
            file_values[key.replace("-", "_")] = value
    out: dict[str, Any] = {}
    for opt in options:
        if hasattr(args, opt.name):
            value = getattr(args, opt.name)
            out[opt.name] = value if opt.switch else _convert(opt, value, opt.flag)
        elif opt.env in environ:
            out[opt.name] = _convert(opt, environ[opt.env], opt.env)
        elif opt.name in file_values:
            out[opt.name] = _convert(opt, file_values[opt.name], str(config_path))
        else:
            out[opt.name] = list(opt.default) if isinstance(opt.default, list) else opt.default
    return out


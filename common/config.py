"""Options: declared once, read from flags, `NAIAD_<OPTION>` environment variables and a TOML
file (`--config`), in that order of precedence, then the declared default.

An option named `heartbeat_interval` is `--heartbeat-interval` on the command line,
`NAIAD_HEARTBEAT_INTERVAL` in the environment and `heartbeat-interval` (or
`heartbeat_interval`) in the file, at top level or in the command's own table (`[peer]`).
Repeatable options take a list in TOML and a comma-separated list in the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sqlite3
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Mapping
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
    at_least: float | None = None  # the smallest value allowed
    above: float | None = None  # a bound the value must exceed

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "NAIAD_" + self.name.upper()


class ConfigError(ValueError):
    """A start-up mistake of the user's: `naiad <command>: <reason>` on stderr, exit status 2."""


def os_reason(e: OSError, subject: str = "") -> str:
    """An OSError in a few words: `not a directory: /x/y`, `address already in use`; the file
    it names left out when it is the `subject` already named."""
    if isinstance(e.errno, int) and e.errno > 0:
        text = os.strerror(e.errno).lower()
    else:  # a resolver error (negative codes) or none
        text = e.strerror or str(e)
    named = e.filename and not subject.endswith(str(e.filename))
    return f"{text}: {e.filename}" if named else text


def writable_dir(root: Path) -> None:
    """`root` made if missing, and proved writable: a data directory that cannot be written is
    refused at start-up, not found out at the first write."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    root.mkdir(parents=True, exist_ok=True)
    try:
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:  # named by the directory, not by the probe's random name
        raise OSError(e.errno, e.strerror) from None


@contextlib.contextmanager
def startup(what: str) -> Iterator[None]:
    """A failure of the system calls in this block (a bind, a mkdir, opening the index) is the
    user's start-up mistake about `what` (`--listen 127.0.0.1:8002`), not a crash."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"{what}: {os_reason(e, what)}") from None
    except sqlite3.Error as e:
        raise ConfigError(f"{what}: {e}") from None


def add_options(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML file with options (flags and NAIAD_* variables win)")
    for opt in options:
        default_text = "" if opt.default in (None, [], False) else f" (default: {opt.default})"
        # argparse %-formats help strings: a literal % ("above 95%") must be doubled.
        kwargs: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS,
                                  "help": (opt.help + default_text).replace("%", "%%")}
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
        return _in_range(opt, opt.type(raw if isinstance(raw, str) else str(raw)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{opt.name} from {origin}: {e}") from None


def _in_range(opt: Option, value: Any) -> Any:
    if value is not None and opt.at_least is not None and value < opt.at_least:
        raise ValueError(f"must be at least {opt.at_least:g}, got {value}")
    if value is not None and opt.above is not None and value <= opt.above:
        raise ValueError(f"must be more than {opt.above:g}, got {value}")
    return value


def resolve(options: list[Option], args: argparse.Namespace, section: str,
            environ: Mapping[str, str] | None = None,
            commands: Mapping[str, list[Option]] | None = None) -> dict[str, Any]:
    """The value of every option, from flags, environment, file and defaults in that order.
    `commands`: every command sharing the file (default: this one), whose options and tables
    the file's top level may hold; anything else there is a mistake."""
    environ = os.environ if environ is None else environ
    commands = commands or {section: options}
    file_values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get("NAIAD_CONFIG")
    if config_path:
        try:
            data = tomllib.loads(Path(config_path).expanduser().read_bytes().decode("utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {config_path}: "
                              f"{os_reason(e, str(config_path))}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {config_path}: {e}") from None
        known = {o.name for o in options}
        anyone = {o.name for opts in commands.values() for o in opts}
        # Top-level keys may belong to other commands sharing the file; the command's own
        # table may only hold its own options.
        stray = sorted(k for k, v in data.items() if not (
            (k in commands and isinstance(v, dict)) or k.replace("-", "_") in anyone))
        if stray:
            raise ConfigError(f"unknown option(s) or table(s) in {config_path}: "
                              f"{', '.join(stray)}")
        table = data.get(section, {})
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


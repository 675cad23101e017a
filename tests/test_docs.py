"""The documents a newcomer reads stay true."""

from __future__ import annotations

from pathlib import Path

from naiad.cli import build_parser, config_reference

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_generated_from_the_option_tables() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), \
        "docs/config.md is stale: regenerate it (see its first comment)"


def naiad_flags() -> set[str]:
    """Every option of every naiad subcommand, from the real parser."""
    import argparse
    flags: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
    walk(build_parser())
    return flags


def test_readme_names_only_options_that_exist() -> None:
    import re
    readme = (ROOT / "README.md").read_text()
    # Other tools' command lines (kubectl, docker-compose, curl) have options of their own.
    ours = "\n".join(line for line in readme.splitlines()
                     if not re.match(r"\s*(kubectl|docker-compose|curl)\b", line)
                     and "--from-literal" not in line)
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", ours))
    unknown = used - naiad_flags()
    assert not unknown, f"README mentions unknown options: {sorted(unknown)}"


def test_readme_quick_start_is_the_ci_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./.ci/run" in readme and "naiad demo" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest" in ci and "apt-get install" in ci


def test_threat_model_names_only_tests_that_exist() -> None:
    """Every row of docs/reliability.md's threat model names the tests that prove it: each
    named file and `file::test` must exist, so a renamed or deleted test breaks the page."""
    import ast
    import re
    page = (ROOT / "docs" / "reliability.md").read_text()
    model = page[page.index("## Threat model"):page.index("## Figures")]
    named = re.findall(r"`(test_\w+\.py)((?:::test_\w+)?)`|`::(test_\w+)`", model)
    assert len(named) > 20, "the threat model should name its tests"
    current = ""
    for file, test, sibling in named:
        if file:
            current = file
        path = ROOT / "tests" / current
        assert path.exists(), f"docs/reliability.md names a missing {current}"
        wanted = (test or f"::{sibling}").removeprefix("::")
        if wanted:
            defined = {n.name for n in ast.walk(ast.parse(path.read_text()))
                       if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
            assert wanted in defined, f"docs/reliability.md names a missing {current}::{wanted}"

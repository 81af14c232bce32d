"""docs/OPERATIONS.md documents exactly the flags each command's ``--help`` shows: a flag in
``--help`` but not in the command's table of "Every flag" fails, and so does a documented
flag the command does not have. The flags of the short guide table ("The flags that
matter") must exist too."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from servers import KVSTORE_BIN

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"
COMMANDS = ["master", "daemon", "status", "bench transfer", "bench master", "bench kernels",
            "plan", "demo"]
_FLAG_RE = re.compile(r"--[a-z][a-z0-9-]*")


def help_flags(command: str) -> set[str]:
    """The long flags of ``kvstore COMMAND --help``, read from its option column."""
    result = subprocess.run([str(KVSTORE_BIN), *command.split(), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    flags: set[str] = set()
    in_options = False
    for line in result.stdout.splitlines():
        if line.startswith("Options:"):
            in_options = True
            continue
        if in_options and re.match(r"^  -", line):
            # the option column ends where click pads before the help text
            flags.update(_FLAG_RE.findall(re.split(r"\s{2,}", line.strip())[0]))
    assert "--help" in flags, result.stdout
    return flags - {"--help"}


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^#|\Z)", text, re.M | re.S)
    assert match, f"docs/OPERATIONS.md has no section {heading!r}"
    return match.group(1)


def documented_flags(command: str) -> set[str]:
    """The flags in the first column of the command's table under "Every flag"."""
    section = _section(OPERATIONS.read_text(), f"### `kvstore {command}`")
    flags: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            flags.update(_FLAG_RE.findall(line.split("|")[1]))
    return flags


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_flag_is_documented_and_every_documented_flag_exists(command):
    shown, documented = help_flags(command), documented_flags(command)
    assert shown, f"kvstore {command} --help shows no flags"
    assert shown - documented == set(), f"in `kvstore {command} --help`, not in OPERATIONS.md"
    assert documented - shown == set(), f"in OPERATIONS.md, not in `kvstore {command} --help`"


def test_guide_table_names_only_existing_flags():
    section = _section(OPERATIONS.read_text(), "## The flags that matter")
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    assert rows
    flags = {command: help_flags(command) for command in ("master", "daemon")}
    for cell in rows:
        named = re.match(r"\s*`(master|daemon) ", cell)
        allowed = flags[named.group(1)] if named else flags["master"] & flags["daemon"]
        for flag in _FLAG_RE.findall(cell):
            assert flag in allowed, f"{flag} in the guide table ({cell.strip()})"


def test_the_check_sees_a_missing_flag():
    """The parser is not vacuous: a real flag of each server is found in --help and in
    its table, and a made-up one in neither."""
    for command in ("master", "daemon"):
        assert {"--metrics-host", "--host", "--log-level"} <= help_flags(command)
        assert {"--metrics-host", "--host", "--log-level"} <= documented_flags(command)
        assert "--no-such-flag" not in help_flags(command) | documented_flags(command)

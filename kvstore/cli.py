"""The ``kvstore`` console script.

Each subcommand lives in the module of the part it runs and is imported only when invoked,
so ``kvstore master`` starts without importing torch or the kernels.
"""

from __future__ import annotations

import importlib

import click

# subcommand -> "module:attribute" of a click.Command
_COMMANDS = {
    "master": "kvstore.master.cli:command",
    "daemon": "kvstore.daemon.cli:command",
    "status": "kvstore.status_cli:command",
    "bench": "kvstore.bench.cli:command",
    "demo": "kvstore.demo.cli:command",
    "plan": "kvstore.plan.cli:command",
}


class _LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvstore")
def main() -> None:
    """kvstore: a KV-cache pool for prefill/decode disaggregated LLM inference."""


if __name__ == "__main__":
    main()

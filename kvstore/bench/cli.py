"""``kvstore bench``: the command group. ``transfer`` (``bench.transfer_cli``), ``master``
(``bench.master``) and ``kernels`` (``bench.kernels``) are imported only when invoked, so
``kvstore bench transfer`` never loads torch. ``kvstore bench`` without a subcommand runs
``kvstore bench transfer`` with its defaults."""

from __future__ import annotations

import importlib

import click

_SUBCOMMANDS = {
    "transfer": "kvstore.bench.transfer_cli:command",
    "master": "kvstore.bench.master:command",
    "kernels": "kvstore.bench.kernels:command",
}


class _LazyBenchGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group("bench", cls=_LazyBenchGroup, invoke_without_command=True)
@click.pass_context
def command(ctx: click.Context) -> None:
    """Measure this deployment: transfer (default), master, kernels."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(ctx.command.get_command(ctx, "transfer"))

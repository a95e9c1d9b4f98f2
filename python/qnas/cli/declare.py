"""click commands made from the commands of qnas.api: one click parameter per declared option
(qnas.options), with the declaration's flag, default, choices, metavar and help. Nothing here repeats a
default or a help text."""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from qnas.api.command import Command
from qnas.options import Declared, build, declared


@dataclass(frozen=True)
class Printer:
    """How the command line shows what a command returns: echo(result, *the command's option instances,
    *the instances of `extra`), where `extra` are options of the command line alone (how to show it)."""

    echo: Callable[..., None]
    extra: tuple[type, ...] = ()


def _type(d: Declared) -> click.ParamType:
    if d.opt.choices is not None:
        return click.Choice(list(d.opt.choices))
    if d.opt.path is not None:
        return click.Path(file_okay=d.opt.path != "dir", dir_okay=d.opt.path != "file", path_type=str)
    if d.opt.parse is not None:
        return click.STRING
    base = d.base
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]
    return {int: click.INT, float: click.FLOAT}.get(base, click.STRING)


def parameter(d: Declared) -> click.Parameter:
    """The click parameter of a declared option; its name is the option's key (qnas.options.Declared.key)."""
    help_text = d.opt.help or None
    if d.opt.argument:
        many = typing.get_origin(d.base) is list
        return click.Argument(
            [d.key], nargs=-1 if many else 1, required=d.required, metavar=d.opt.metavar, type=_type(d)
        )
    names = [d.flag, *d.opt.aliases, d.key]
    if d.is_flag:
        return click.Option(names, is_flag=True, help=help_text)
    default = None if d.required else d.to_text(d.default)
    return click.Option(
        names,
        type=_type(d),
        default=default,
        required=d.required,
        show_default=default is not None,
        metavar=d.opt.metavar,
        help=help_text,
    )


def click_command(command: Command, printer: Printer) -> click.Command:
    """The click command of an API command: its options from the declarations, --config FILE where the
    command takes one; the callback builds the option instances, runs the command and prints."""
    from qnas.runconfig import config_param

    classes = (*command.options, *printer.extra)
    params = [parameter(d) for cls in classes for d in declared(cls)]
    names = [p.name for p in params]
    assert len(names) == len(set(names)), f"{command.name}: an option is declared twice"
    if command.config:
        params.insert(0, config_param())

    def callback(**values: Any) -> None:
        instances = build(classes, values, f"qnas {command.name}")
        n = len(command.options)
        printer.echo(command.run(*instances[:n]), *instances)

    return click.Command(command.name, params=params, callback=callback, help=command.__doc__)

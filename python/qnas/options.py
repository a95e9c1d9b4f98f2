"""Options written once. The dataclasses the library takes (TrainOptions, SearchOptions, StrategyOptions,
the command options of qnas.api) declare every option in its field: the default is the field's, and
`option()` adds the help, the choices, the metavar and how the command line spells it. From that one
declaration come the `qnas` command's options (qnas.cli.declare), the options record of a run's
config.json (`record`), what `--config FILE` accepts (qnas.runconfig) and the keyword arguments of the
Python API (qnas.api).

A field's value is what the library works with (bits=[4, 8], adq=True); its command-line text is what a
user types and config.json records ("--bits 4,8", "--no-adq"): `parse` turns the text into the value and
`text` the value into the text; a bool field whose default is True is a flag that sets it False.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass
from typing import Any

from qnas.errors import QnasError

_KEY = "qnas.option"


@dataclass(frozen=True)
class Opt:
    """How a dataclass field is an option of a command (see `option`)."""

    help: str = ""
    flag: str | None = None  # the long option; default --field-name
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    at_least: int | None = None  # the smallest value (check_declared)
    parse: Callable[[str, str], Any] | None = None  # (text, flag) -> value
    text: Callable[[Any], Any] | None = None  # value -> text (config.json, the default shown)
    path: str | None = None  # "file", "dir" or "any": a path (an existing one of the other kind is refused)
    argument: bool = False  # positional; a list field takes any number
    aliases: tuple[str, ...] = ()  # further spellings of the flag
    record: bool = True  # recorded in a run's config.json (not: where it is written, how it is shown)
    cli: bool = True  # False: not an option (a value the command resolves from others)


def option(default: Any = MISSING, *, default_factory: Any = MISSING, **opt: Any) -> Any:
    """A dataclass field that is a command option (keywords: those of Opt)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: Opt(**opt)})


@dataclass(frozen=True)
class Declared:
    """One option of a command: its field, its Opt and the field's type."""

    field: dataclasses.Field
    opt: Opt
    type: Any

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def flag(self) -> str:
        return self.opt.flag or "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """Its name in config files and config.json, and its click parameter: the flag, underscored."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def base(self) -> type:
        """The field's type without `| None`."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        return args[0] if typing.get_origin(self.type) in (typing.Union, _UnionType) and args else self.type

    @property
    def is_flag(self) -> bool:
        return self.base is bool

    @property
    def inverted(self) -> bool:
        """A bool field whose default is True: its flag sets it False (--no-adq, --untie-bits)."""
        return self.is_flag and self.default is True

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def default(self) -> Any:
        f = self.field
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:
            return f.default_factory()
        return MISSING

    def to_text(self, value: Any) -> Any:
        """The command-line text of a field value (what config.json records)."""
        if self.inverted:
            return not value
        if self.opt.text is not None and value is not None:
            return self.opt.text(value)
        return list(value) if isinstance(value, tuple) else value

    def value(self, given: Any) -> Any:
        """The field value of what a command line, a config file or the Python API gave: the text, or (from
        Python) the value itself; a flag's bool (--no-adq given: adq False)."""
        if self.inverted:
            return not given
        if self.opt.parse is not None and isinstance(given, str):
            return self.opt.parse(given, self.flag)
        return list(given) if isinstance(given, tuple) else given


_UnionType = type(int | None)


def declared(cls: type) -> list[Declared]:
    """The options a dataclass declares, in field order (fields with cli=False left out)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get(_KEY, Opt())
        if opt.cli:
            out.append(Declared(f, opt, hints[f.name]))
    return out


def check_declared(instance: Any) -> None:
    """The checks an option's declaration implies: its choices, its smallest value (QnasError naming it)."""
    for d in declared(type(instance)):
        value = getattr(instance, d.name)
        if d.opt.choices is not None and value not in d.opt.choices:
            raise QnasError(f"{d.flag}: expected one of {', '.join(d.opt.choices)}, got {value!r}")
        if d.opt.at_least is not None and value < d.opt.at_least:
            raise QnasError(f"{d.flag}: must be at least {d.opt.at_least}, got {value}")


def build(classes: Iterable[type], values: dict[str, Any], what: str) -> list[Any]:
    """Instances of `classes` from option values keyed by Declared.key (the command line's parameters, a
    config file's keys, the Python API's keyword arguments); an option not given takes its default. A key
    that is no option of any of them, or a required option not given, is a QnasError naming `what`."""
    classes = list(classes)
    keys = {d.key: d for cls in classes for d in declared(cls)}
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise QnasError(
            f"{what}: unknown option {', '.join(map(repr, unknown))} (known: {', '.join(sorted(keys))})"
        )
    missing = [d.flag for d in keys.values() if d.required and values.get(d.key) is None]
    if missing:
        raise QnasError(f"{what}: {', '.join(missing)} is required")
    return [
        cls(**{d.name: d.value(values[d.key]) for d in declared(cls) if d.key in values}) for cls in classes
    ]


def record(*instances: Any) -> dict[str, Any]:
    """The options record of a run's config.json: every recorded option of the instances as command-line
    text, keyed as `--config` files key them (so `--config RUN/config.json` replays the run)."""
    return {
        d.key: d.to_text(getattr(inst, d.name))
        for inst in instances
        for d in declared(type(inst))
        if d.opt.record and not d.opt.argument
    }


# -- parsers of option texts ----------------------------------------------------------------------------


def int_list(text: str, flag: str) -> list[int]:
    """ "4,8" -> [4, 8]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QnasError(f"{flag} {text!r}: expected comma-separated integers, e.g. 4,8") from None


def name_list(text: str, flag: str) -> list[str] | None:
    """ "a,b" -> ["a", "b"]; "" -> None."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    return names or None


def comma_text(values: Iterable[Any]) -> str:
    return ",".join(str(v) for v in values)


def json_value(text: str, flag: str) -> Any:
    """A JSON text (--model-args, --quant-options)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise QnasError(f"{flag}: not valid JSON ({e})") from e


def json_text(value: Any) -> str:
    return json.dumps(value)


def size_text(size: Iterable[int]) -> str:
    """[180, 320] -> "180x320"."""
    return "x".join(str(int(v)) for v in size)


@dataclass
class RunControl:
    """Where a run command (train, search, strategy) writes, and how it runs: none of it changes the result."""

    out: str = option(path="any", record=False, help="Run folder to write.")
    compile: bool = option(
        False,
        help="Run the networks' forwards through torch.compile after a few eager steps (one graph per step; "
        "the same numbers).",
    )
    quiet: bool = option(False, record=False, help="No progress bar.")


@dataclass
class Resume:
    """`--resume` of the resumable run commands (train, search)."""

    resume: bool = option(False, record=False, help="Continue the run in --out from its last checkpoint.")

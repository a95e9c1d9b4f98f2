"""`--config FILE` of the long-running commands (`qnas train`, `search`, `strategy`), as BasicSR's
option files: a JSON object whose keys are the command's options ("batch_size" or "batch-size"; the
option's long name, e.g. "model", "arch", "init"), options on the command line win.

The file's values become click's default map (ctx.default_map) before any other option is read, so a
value from the file goes through the option's own type and checks, and the command line overrides it.
A value of the wrong JSON type (a string for an integer option, a number for a flag) is refused rather
than coerced, and so is a key that names no option; both are one-line errors naming the file and key.

A run folder's config.json is such a file: the commands record the options they ran with under
"options" (qnas.options.record: every option declared with record=True, as command-line text), beside
the resolved sections they derive from them (RUN_METADATA: the network config, the
train/search/strategy options, the space document...). Given a run's config.json, --config reads
"options" and ignores those sections; any other top-level key is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from qnas.errors import QnasError
from qnas.files import read_json_object

#: Top-level keys of a run's config.json besides "options": what the command derived from its options
#: (and "command", the command that wrote it). A run config is read for its "options" alone.
RUN_METADATA = (
    "command",
    "network",
    "train",
    "init",
    "validation",
    "search",
    "space",
    "strategy",
    "checkpoint",
)


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """{config key: option} of a command: each option's long name, underscored."""
    keys = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "config":
            longs = [o for o in param.opts if o.startswith("--")]
            if longs:
                keys[_key(longs[0])] = param
    return keys


def read_config(path: str, command: str) -> dict[str, Any]:
    """The {key: value} options of a config file (a run's config.json: its "options")."""
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        raise QnasError(f"--config {path}: YAML is not read (PyYAML is not a dependency); give a JSON file")
    try:
        doc = read_json_object(path, "config file", expected="a JSON object of options")
    except QnasError as e:
        raise QnasError(f"--config {e}") from e
    if "options" not in doc:
        if any(k in doc for k in ("network", "search", "strategy")) and "command" not in doc:
            # A run's config.json written without its options record: the resolved sections alone do
            # not say which options produced them (a quantization plan, a genotype file's path).
            raise QnasError(
                f'--config {path}: a run config.json without an "options" record; give the run\'s '
                "options on the command line"
            )
        return doc
    options = doc["options"]
    if not isinstance(options, dict):
        raise QnasError(f"--config {path}: key 'options': expected a JSON object")
    if doc.get("command", command) != command:
        raise QnasError(f"--config {path}: the config of a `qnas {doc['command']}` run, not `qnas {command}`")
    for key in doc:
        if key != "options" and key not in RUN_METADATA:
            raise QnasError(f"--config {path}: unknown key {key!r} beside the run's 'options'")
    return options


def _value(param: click.Option, value: Any, ctx: click.Context, where: str) -> Any:
    """`value` checked against the option's JSON type, then converted by the option's own type."""
    if value is None:
        if param.required:
            raise QnasError(f"{where}: must not be null")
        return None
    t = param.type
    if param.is_flag:
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(t, click.types.IntParamType):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(t, click.types.FloatParamType):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise QnasError(f"{where}: expected {want}, got {json.dumps(value)[:60]}")
    if param.is_flag:
        return value
    try:
        return t.convert(value, param, ctx)
    except click.BadParameter as e:
        raise QnasError(f"{where}: {e.message}") from e


def _load(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    if path is None:
        return
    keys = option_keys(ctx.command)
    defaults = dict(ctx.default_map or {})
    seen: dict[str, str] = {}
    for key, value in read_config(path, ctx.info_name).items():
        name = _key(key) if isinstance(key, str) else key
        if name not in keys:
            raise QnasError(f"--config {path}: unknown key {key!r} (not an option of `qnas {ctx.info_name}`)")
        if name in seen:
            raise QnasError(f"--config {path}: keys {seen[name]!r} and {key!r} name the same option")
        seen[name] = key
        option = keys[name]
        defaults[option.name] = _value(option, value, ctx, f"--config {path}: key {key!r}")
    ctx.default_map = defaults


def config_param() -> click.Option:
    """The --config FILE option (read before every other option; see the module docstring)."""
    return click.Option(
        ["--config"],
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=str),
        is_eager=True,
        expose_value=False,
        callback=_load,
        help="JSON file of options (keys: option names; a run's config.json replays that run). "
        "Options given here override it.",
    )

"""The Python API: every `qnas` command as a function of the command's options, the same code the
command line runs (qnas.cli only parses, then prints what these return).

Keyword arguments are the command's options as a `--config` file names them: the long option without
its dashes, underscored (`batch_size`, `val_data`, flags as given: `no_adq=True`); values are what the
library works with (`bits=[4, 8]`) or the command line's text (`bits="4,8"`); options not given take
their defaults. A search, its genotype retrained, exported and run:

    from qnas import api

    found = api.search(space="basic", scale=4, steps=300, target_gbitops=20.0, out="runs/search")
    trained = api.train(arch=found["genotype"], steps=1500, out="runs/retrain")
    api.export(run=trained["run"], format="packed", out="model.qnp")
    api.upscale(model="model.qnp", paths=["photo.png", "photo_x4.png"])

Importing this module imports no torch; each command imports what it runs.
"""

from qnas.api.command import Command, build_network, load_network, register_network_kinds
from qnas.api.demo import demo
from qnas.api.deploy import export, upscale
from qnas.api.evaluate import cost, evaluate, inspect
from qnas.api.nas import genotype, report, search
from qnas.api.train import strategy, train

#: Every command, in the order `qnas --help` lists them.
COMMANDS: tuple[Command, ...] = (
    search,
    genotype,
    train,
    strategy,
    evaluate,
    cost,
    report,
    inspect,
    export,
    upscale,
    demo,
)

__all__ = [
    "COMMANDS",
    "Command",
    "build_network",
    "cost",
    "demo",
    "evaluate",
    "export",
    "genotype",
    "inspect",
    "load_network",
    "register_network_kinds",
    "report",
    "search",
    "strategy",
    "train",
    "upscale",
]

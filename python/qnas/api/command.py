"""A command of qnas, once: its option dataclasses (qnas.options) and the function that runs it. The Python
API calls it with keyword arguments, the `qnas` command line (qnas.cli) with what it parsed; both build the
same option instances and run the same function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qnas.options import build


class Command:
    """`name`: the command; `options`: its option dataclasses, in order; `run(*instances)` runs it and
    returns what it reports (a dict). `config`: the command takes `--config FILE` (qnas.runconfig).
    Calling it with keyword arguments (the options' names as in a config file: `batch_size`, `no_adq`,
    `val_data`) runs it with the defaults for the rest."""

    def __init__(
        self,
        name: str,
        options: tuple[type, ...],
        run: Callable[..., dict[str, Any]],
        *,
        config: bool = False,
    ):
        self.name, self.options, self.run, self.config = name, options, run, config
        self.__doc__ = run.__doc__
        self.__name__ = self.__qualname__ = name

    def __call__(self, **options: Any) -> dict[str, Any]:
        return self.run(*build(self.options, options, f"qnas.api.{self.name}"))

    def __repr__(self) -> str:
        return f"<qnas command {self.name}>"


def register_network_kinds() -> None:
    """Registers every network kind qnas defines (qnas.runs.network): "genotype" by importing qnas.nas.derive,
    which imports qnas.quant.apply, where "sr" is registered."""
    import qnas.nas.derive  # noqa: F401


def load_network(path: str) -> tuple[Any, dict]:
    """(network with its trained weights, in eval mode; the model file's dict) of any run qnas writes:
    a run folder or its model.pt (qnas.runs.network.load_network, every kind registered)."""
    from qnas.runs.network import load_network as load

    register_network_kinds()
    return load(path)


def build_network(config: dict) -> Any:
    """The network of a network config of any kind (qnas.runs.network.build_network)."""
    from qnas.runs.network import build_network as build_net

    register_network_kinds()
    return build_net(config)

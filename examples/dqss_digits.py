"""DQSS on a second task: a small CNN classifying scikit-learn's 8x8 digits (shipped inside the
scikit-learn wheel, nothing is downloaded), as the DQSS seed shows its search on classification too.

1. trains the full-precision CNN (Adam, a few epochs, seconds on a CPU);
2. post-training quantization of every convolution at --bits with each single strategy (the
   uniform baselines) and with the DQSS search over all of them, the same calibration batches and
   steps for every run (qnas.quant.dqss: calibrate, ptq_search on the logits' MSE to the FP net;
   DQSS starts from the per-layer local errors and minimizes the expected loss of a sampled
   network, as `qnas strategy` does by default: docs/quantization.md);
3. prints test accuracy per run and the strategies DQSS chose per layer.

    python examples/dqss_digits.py [--bits 3] [--steps 60] [--epochs 30] [--seed 0]
        [--init local|uniform] [--objective expected|mixture] [--sampling soft|hard]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from torch import nn

from qnas.quant.dqss import (
    DQSS_STRATEGIES,
    build_supernet,
    calibrate,
    derive_network,
    derive_plan,
    init_logits_from_local_error,
    ptq_search,
)


class DigitsCNN(nn.Module):
    """conv3x3(1→16)-ReLU-conv3x3(16→32)-ReLU-maxpool-conv3x3(32→32)-ReLU-global average-linear."""

    in_channels = 1

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def load_digits(seed: int = 0):
    """(x_train, y_train, x_test, y_test): images [N,1,8,8] in [0, 1], a fixed 500-image test split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ModuleNotFoundError:
        raise SystemExit("examples/dqss_digits.py needs scikit-learn: pip install 'qnas[examples]'") from None

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:500], perm[500:]
    return x[train], y[train], x[test], y[test]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_float(x, y, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def ptq(
    fp: nn.Module,
    quantizers,
    bits: int,
    calib: list[torch.Tensor],
    steps: int,
    hard: bool = False,
    init: str = "local",
    objective: str = "expected",
) -> tuple[nn.Module, dict]:
    """PTQ of every convolution of a copy of `fp` with `quantizers` (DQSS when several)."""
    supernet = copy.deepcopy(fp)
    # All three convolutions are searched (first and last included: a small network quantized end to end).
    layers = _all_convs(supernet, calib[0])
    build_supernet(supernet, quantizers, bits, layers=layers)
    calibrate(supernet, calib)
    if init == "local":
        init_logits_from_local_error(supernet, fp, calib)
    plans = []

    def derive(sup: nn.Module) -> nn.Module:
        plans.append(derive_plan(sup, list(quantizers), bits))
        return derive_network(sup, copy.deepcopy(fp), plans[-1])

    # The last quarter of the steps tunes the derived network (qnas.quant.dqss.ptq_phases).
    net = ptq_search(
        supernet, fp, calib, steps, derive=derive, hard=hard, expected_loss=objective == "expected"
    )
    return net, plans[-1]


def _all_convs(model: nn.Module, example: torch.Tensor) -> dict[str, bool]:
    from qnas.quant.dqss import _probe_with

    return {n: not nonneg for n, nonneg in _probe_with(model, example).items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="PTQ optimization steps per run")
    p.add_argument("--epochs", type=int, default=30, help="full-precision training epochs")
    p.add_argument("--calib", type=int, default=4, help="calibration batches of 64 training images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantizers", default=",".join(DQSS_STRATEGIES))
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--sampling",
        choices=["soft", "hard"],
        default="soft",
        help="DQSS search forward: the softmax mixture, or one sampled discrete network per step",
    )
    p.add_argument("--init", choices=["local", "uniform"], default="local", help="DQSS starting logits")
    p.add_argument(
        "--objective",
        choices=["expected", "mixture"],
        default="expected",
        help="DQSS search loss: expected loss of a sampled network, or the mixture's loss alone",
    )
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits(args.seed)
    fp = train_float(xtr, ytr, args.epochs, args.seed)
    calib = list(xtr[: 64 * args.calib].split(64))
    names = [n.strip() for n in args.quantizers.split(",")]
    results = {"float": accuracy(fp, xte, yte)}
    for q in names:
        if q == "hwgq":  # activations only: no uniform baseline of its own
            continue
        torch.manual_seed(args.seed)
        net, _ = ptq(fp, [q], args.bits, calib, args.steps)
        results[q] = accuracy(net, xte, yte)
    torch.manual_seed(args.seed)
    net, plan = ptq(
        fp,
        names,
        args.bits,
        calib,
        args.steps,
        hard=args.sampling == "hard",
        init=args.init,
        objective=args.objective,
    )
    results["dqss"] = accuracy(net, xte, yte)
    chosen = {n: (s["w"]["quantizer"], s["a"]["quantizer"]) for n, s in plan["layers"].items()}
    if args.json:
        print(json.dumps({"accuracy": results, "chosen": chosen, "bits": args.bits}, indent=2))
    else:
        print(f"digits, {args.bits}-bit PTQ of every convolution, test accuracy on 500 held-out images")
        for k, v in results.items():
            print(f"  {k:<11} {100 * v:6.2f} %")
        for n, (w, a) in chosen.items():
            print(f"  DQSS {n}: weights {w}, inputs {a}")
    return {"accuracy": results, "chosen": chosen}


if __name__ == "__main__":
    main()

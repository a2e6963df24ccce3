"""Train a small MLP with ZeRO and print each rank's memory next to the paper's formula.

python -m impl.distributed.train_zero --stage 3 --world-size 2             # spawns the ranks itself
torchrun --nproc-per-node 2 -m impl.distributed.train_zero --stage 3 --world-size 2   # the same, by torchrun
"""

import argparse
import sys
import threading
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from impl.common import cli
from impl.distributed.launch import spawn
from impl.distributed.zero import STAGES, Zero

# bytes per parameter on each of N ranks (ZeRO paper, Fig. 1): (fp32 Adam, mixed-precision Adam)
FORMULA = {
    0: (lambda n: 16, lambda n: 16),
    1: (lambda n: 8 + Fraction(8, n), lambda n: 4 + Fraction(12, n)),
    2: (lambda n: 4 + Fraction(12, n), lambda n: 2 + Fraction(14, n)),
    3: (lambda n: Fraction(16, n), lambda n: Fraction(16, n)),
}


def _train(rank: int, world_size: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    layers = [m for _ in range(args.layers) for m in (nn.Linear(args.width, args.width), nn.GELU())]
    model = nn.Sequential(*layers, nn.Linear(args.width, 1))
    zero = Zero(model, torch.optim.AdamW, stage=args.stage, mixed_precision=args.mixed_precision, lr=args.lr)
    target = torch.randn(args.width, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(100 + rank)  # every rank draws its own share of each batch
    local_batch = args.batch // world_size
    losses = []
    # tqdm's default lock is a multiprocessing semaphore; a rank stopped by Ctrl-C never unlinks it, and the
    # resource tracker then warns about it after our one line. One process, one thread: a thread lock serves.
    tqdm.set_lock(threading.RLock())
    for _ in tqdm(range(args.steps), desc=f"ZeRO-{args.stage}", disable=rank != 0):
        x = torch.randn(local_batch, args.width, generator=data)
        loss = F.mse_loss(zero(x).float().squeeze(-1), torch.tanh(x @ target))
        loss.backward()
        zero.step()
        losses.append(loss.item())
        memory = zero.memory_breakdown()
        zero.zero_grad()
    return {"rank": rank, "first_loss": losses[0], "last_loss": losses[-1], "memory": memory}


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("impl.distributed.train_zero", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=STAGES, default=3)
    parser.add_argument("--world-size", type=cli.positive_int, default=2)
    parser.add_argument("--mixed-precision", action="store_true", help="bf16 params/grads, fp32 master + Adam")
    parser.add_argument("--steps", type=cli.positive_int, default=200)
    parser.add_argument("--width", type=cli.positive_int, default=128)
    parser.add_argument("--layers", type=cli.non_negative_int, default=3, help="hidden Linear+GELU layers")
    parser.add_argument("--batch", type=cli.positive_int, default=32, help="global batch, split across the ranks")
    parser.add_argument("--lr", type=cli.positive_float, default=1e-3)
    parser.add_argument("--timeout-s", type=cli.positive_float, default=60.0, help="limit on every collective")
    args = parser.parse_args(argv)
    if args.batch % args.world_size:
        parser.error(f"--batch must be divisible by --world-size={args.world_size}, got {args.batch}")
    for result in spawn(_train, args.world_size, args, timeout_s=args.timeout_s):
        m = result["memory"]
        per_param = Fraction(m["total"], m["numel"])
        paper = FORMULA[args.stage][args.mixed_precision](m["world_size"])
        print(
            f"rank {result['rank']}: loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}; "
            f"params {m['params']} B, grads {m['grads']} B, master {m['master']} B, optimizer {m['optimizer']} B; "
            f"{float(per_param):.3f} bytes/param (paper: {float(paper):.3f}, padding {m['padding']} elements)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

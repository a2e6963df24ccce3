"""The LoRA teaching toy: adapt a small MLP to a distribution shift by training a rank-2 update of one layer.

A 3-layer ReLU MLP learns to classify points labelled by a fixed random "teacher" network. It is trained only on
inputs drawn uniformly from the unit sphere, then evaluated on Gaussian inputs, whose norms (about sqrt(dim)) it has
never seen, so its accuracy drops. LoRA (Hu et al., 2021, Eq. 3) then freezes the whole network and trains only a
rank-2 update B A of its middle layer on Gaussian data: a few hundred parameters recover most of the accuracy.

    python -m impl.finetune.lora_toy            # a few seconds on a laptop CPU
    python -m impl.finetune.lora_toy --help
"""

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from impl.finetune.lora import apply_lora, trainable_parameters


@dataclass
class ToyConfig:
    dim: int = 16  # input dimension
    hidden: int = 32  # width of the two hidden layers
    classes: int = 4  # number of labels
    teacher_bias: float = 0.2  # std of the teacher's biases: nonzero, so labels depend on the input's norm
    samples: int = 2048  # training (and test) points per distribution
    pretrain_steps: int = 300  # full-batch Adam steps on sphere inputs
    pretrain_lr: float = 1e-2  # Adam learning rate of the pretraining
    finetune_steps: int = 600  # full-batch Adam steps of the LoRA update on Gaussian inputs
    finetune_lr: float = 3e-2  # Adam learning rate of the LoRA update
    rank: int = 2  # LoRA rank of the middle layer's update
    alpha: float = 16.0  # LoRA scaling numerator (update scaled by alpha / rank)
    seed: int = 0  # seeds the teacher, the data and the student


def mlp(dim: int, hidden: int, classes: int) -> nn.Sequential:
    """Three linear layers with ReLUs; the middle one (index 2) is the LoRA target."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def sphere(n: int, dim: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, dim, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, desc: str, progress: bool) -> None:
    """Full-batch Adam on cross-entropy, over the parameters that require grad."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def run(config: ToyConfig, progress: bool = True) -> dict[str, float]:
    """Pretrain on the sphere, evaluate on Gaussians, LoRA-finetune the middle layer on Gaussians; return the
    held-out accuracies and the fraction of parameters the finetune trained."""
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    teacher = mlp(config.dim, config.hidden, config.classes)
    with torch.no_grad():
        for layer in teacher[::2]:
            layer.bias.normal_(0, config.teacher_bias, generator=g)

    def labelled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return x, teacher(x).argmax(dim=1)

    n, d = config.samples, config.dim
    sphere_train, sphere_test = labelled(sphere(n, d, g)), labelled(sphere(n, d, g))
    gauss_train, gauss_test = labelled(torch.randn(n, d, generator=g)), labelled(torch.randn(n, d, generator=g))

    student = mlp(d, config.hidden, config.classes)
    train(student, *sphere_train, config.pretrain_steps, config.pretrain_lr, "pretrain on the sphere", progress)
    result = {"sphere_acc": accuracy(student, *sphere_test), "gauss_acc_before": accuracy(student, *gauss_test)}
    apply_lora(student, ["2"], config.rank, config.alpha)  # "2": the middle nn.Linear of the Sequential
    train(student, *gauss_train, config.finetune_steps, config.finetune_lr, "LoRA finetune on Gaussians", progress)
    trainable, total = trainable_parameters(student)
    result.update(gauss_acc_after=accuracy(student, *gauss_test), trainable=trainable, total=total)
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    from impl.common import cli

    kinds = {  # the check of each ToyConfig field on the command line
        **dict.fromkeys(("dim", "hidden", "samples", "pretrain_steps", "finetune_steps", "rank"), cli.positive_int),
        "classes": cli.int_at_least(2),
        **dict.fromkeys(("pretrain_lr", "finetune_lr", "alpha"), cli.positive_float),
        "teacher_bias": cli.non_negative_float,
        "seed": cli.non_negative_int,
    }
    parser = cli.parser("impl.finetune.lora_toy", description=__doc__.split("\n\n")[0])
    for name, value in vars(ToyConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kinds[name], default=value, help=f"default {value}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = vars(parser.parse_args(argv))
    quiet = args.pop("quiet")
    result = run(ToyConfig(**args), progress=not quiet)
    print(f"accuracy on the sphere (training distribution):  {result['sphere_acc']:.3f}")
    print(f"accuracy on Gaussian inputs before LoRA:         {result['gauss_acc_before']:.3f}")
    print(f"accuracy on Gaussian inputs after rank-{args['rank']} LoRA:   {result['gauss_acc_after']:.3f}")
    share = result["trainable"] / result["total"]
    print(f"parameters trained by LoRA: {result['trainable']} of {result['total']} ({100 * share:.1f}%)")
    return result


if __name__ == "__main__":
    main()

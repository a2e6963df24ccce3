"""python -m impl.clip.train: CLIP trained on scikit-learn's digits with captions, then zero-shot classification.

The teaching version of CLIP (Radford et al. 2021) on real data that ships with scikit-learn: 1,797 8x8 digits,
each paired with a caption drawn from several templates ("a hand written number three", ...; the data set, its
split and templates live in impl.data). Zero-shot classification is the paper's section 3.1.2 recipe: embed one
prompt per class (averaged over templates, the prompt ensembling of section 3.1.4), and pick the class whose text
embedding has the largest cosine with the image's. It is judged on a held-out split of the images, with the
training templates and with templates the model never saw.

    python -m impl.clip.train --epochs 15 --out runs/clip  # accuracies, confusion.png
"""

import sys
from dataclasses import dataclass, field, fields

import torch
from tqdm import tqdm

from impl.clip.losses import check_unit_norm
from impl.clip.model import CLIP, CLIPConfig, WordTokenizer
from impl.common import resolve_device, seed_everything
from impl.common.checks import check_number, check_positive_int, check_positive_number, check_probability
from impl.data import CLASS_NAMES, TRAIN_TEMPLATES, UNSEEN_TEMPLATES, caption_texts, captions, load_digits_split


@dataclass
class TrainConfig:
    epochs: int = 15  # passes over the training split
    batch_size: int = 64  # image-caption pairs per step
    lr: float = 2e-3  # AdamW learning rate, cosine-decayed to 0
    weight_decay: float = 0.01
    test_fraction: float = 0.2  # held-out share of the 1,797 digits, stratified by class
    seed: int = 0
    device: str = "cpu"
    model: CLIPConfig = field(default_factory=CLIPConfig)  # vocab_size is set from the tokenizer

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            check_positive_int(f"TrainConfig.{name}", getattr(self, name))
        check_positive_number("TrainConfig.lr", self.lr)
        check_number("TrainConfig.weight_decay", self.weight_decay, low=0)
        check_probability("TrainConfig.test_fraction", self.test_fraction, low_open=True, high_open=True)


@dataclass
class TrainResult:
    model: CLIP
    tokenizer: WordTokenizer
    losses: list[float]  # training loss per step
    accuracy: float  # zero-shot accuracy on the held-out split, training templates ensembled
    unseen_accuracy: dict[str, float]  # per unseen template, and "ensemble" over all of them
    confusion: torch.Tensor  # (10, 10) counts, rows true digit, columns predicted, held-out split


@torch.no_grad()
def class_embeddings(model: CLIP, tokenizer: WordTokenizer, templates: tuple[str, ...]) -> torch.Tensor:
    """(10, embed_dim) unit-norm class embeddings: each class's prompts embedded, averaged, renormalized."""
    prompts = [t.format(name) for name in CLASS_NAMES for t in templates]
    device = model.logit_scale.device
    embeds = model.encode_text(tokenizer.encode(prompts, model.config.context_length).to(device))
    embeds = embeds.view(len(CLASS_NAMES), len(templates), -1).mean(1)  # (10, T, D) -> (10, D)
    return torch.nn.functional.normalize(embeds, dim=-1)


def zero_shot_predict(image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """Class index of largest cosine for each image; both inputs must already be L2-normalized."""
    if image_embeds.dim() != 2 or class_embeds.dim() != 2 or image_embeds.shape[1] != class_embeds.shape[1]:
        raise ValueError(
            f"class_embeds must be (C, D) with image_embeds (N, D), got {tuple(class_embeds.shape)} and "
            f"{tuple(image_embeds.shape)}"
        )
    check_unit_norm("image_embeds", image_embeds)
    check_unit_norm("class_embeds", class_embeds)
    return (image_embeds @ class_embeds.T).argmax(dim=1)


@torch.no_grad()
def zero_shot_accuracy(
    model: CLIP, tokenizer: WordTokenizer, images: torch.Tensor, labels: torch.Tensor, templates: tuple[str, ...]
) -> tuple[float, torch.Tensor]:
    """(accuracy, (10, 10) confusion counts) of zero-shot classification with prompts from `templates`."""
    model.eval()
    device = model.logit_scale.device
    pred = zero_shot_predict(model.encode_image(images.to(device)), class_embeddings(model, tokenizer, templates)).cpu()
    confusion = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    return (pred == labels).float().mean().item(), confusion


def train(config: TrainConfig | None = None, progress: bool = False) -> TrainResult:
    """Train a CLIP on the digits' training split (seeded) and evaluate it zero-shot on the held-out split."""
    config = config or TrainConfig()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    train_x, train_y, test_x, test_y = load_digits_split(config.test_fraction, config.seed)
    tokenizer = WordTokenizer(caption_texts(TRAIN_TEMPLATES))
    config.model.vocab_size = len(tokenizer)
    model = CLIP(config.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(train_y) // config.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="clip", disable=not progress)
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=g)
        for step in range(steps_per_epoch):
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            tokens = tokenizer.encode(captions(train_y[rows], TRAIN_TEMPLATES, g), config.model.context_length)
            loss = model(train_x[rows].to(device), tokens.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            model.clamp_logit_scale()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    accuracy, confusion = zero_shot_accuracy(model, tokenizer, test_x, test_y, TRAIN_TEMPLATES)
    unseen = {t: zero_shot_accuracy(model, tokenizer, test_x, test_y, (t,))[0] for t in UNSEEN_TEMPLATES}
    unseen["ensemble"] = zero_shot_accuracy(model, tokenizer, test_x, test_y, UNSEEN_TEMPLATES)[0]
    return TrainResult(model, tokenizer, losses, accuracy, unseen, confusion)


def confusion_figure(confusion: torch.Tensor, title: str = "CLIP zero-shot confusion"):
    """The (10, 10) confusion counts drawn with matplotlib, as a PIL image."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    ax.imshow(confusion.numpy(), cmap="Blues")
    for (i, j), count in zip(torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(), confusion.flatten()):
        color = "white" if count > confusion.max() / 2 else "black"
        ax.text(j, i, str(count.item()), ha="center", va="center", fontsize=8, color=color)
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit", title=title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    from impl.common import cli

    parser = cli.parser("impl.clip.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=cli.positive_int, default=TrainConfig.epochs, help="passes over the data")
    parser.add_argument("--batch-size", type=cli.positive_int, default=TrainConfig.batch_size, help="pairs per step")
    parser.add_argument("--lr", type=cli.positive_float, default=TrainConfig.lr, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=cli.non_negative_float, default=TrainConfig.weight_decay)
    parser.add_argument("--test-fraction", type=cli.open_unit_interval, default=TrainConfig.test_fraction)
    parser.add_argument("--seed", type=cli.non_negative_int, default=TrainConfig.seed)
    parser.add_argument("--device", type=cli.device, default=TrainConfig.device)
    parser.add_argument("--out", type=cli.writable_dir, default=None, help="folder for confusion.png (optional)")
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "model"})
    result = train(config, progress=True)
    print(f"final loss {result.losses[-1]:.4f}, logit scale {result.model.logit_scale.exp().item():.1f}")
    print(f"zero-shot accuracy, held-out split, training templates: {result.accuracy:.3f}")
    for template, acc in result.unseen_accuracy.items():
        print(f"zero-shot accuracy, held-out split, unseen template {template!r}: {acc:.3f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        confusion_figure(result.confusion).save(args.out / "confusion.png")
        print(f"wrote {args.out / 'confusion.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

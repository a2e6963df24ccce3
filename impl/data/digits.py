"""scikit-learn's 8x8 digits with captions: the one home of the data set that CLIP, GLIDE and unCLIP train on.

1,797 grey 8x8 images of handwritten digits (`sklearn.datasets.load_digits`, values 0..16, shipped with
scikit-learn: no download), split once into a stratified training and held-out part, and captioned from word
templates ("a hand written number three", ...). The templates never used for a training caption
(`UNSEEN_TEMPLATES`) put the same words in new combinations, for CLIP's zero-shot test on unseen prompts.
"""

import torch

from impl.common.checks import check_instance, check_positive_int, check_probability, check_tensor

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = (
    "a hand written number {}",
    "a picture of the digit {}",
    "an image of a {}",
    "the number {}",
    "a photo of the handwritten digit {}",
    "a small blurry {}",
)
UNSEEN_TEMPLATES = ("a photo of the number {}", "an image of the hand written digit {}", "a blurry picture of a {}")
EVAL_TEMPLATE = TRAIN_TEMPLATES[0]  # the caption generated samples are asked for and judged against


def _check_templates(templates: tuple[str, ...]) -> None:
    if not isinstance(templates, tuple | list) or not templates or not all(
        isinstance(t, str) and "{}" in t for t in templates
    ):
        raise ValueError(f"templates must be a non-empty tuple of strings holding '{{}}', got {templates!r}")


def caption_texts(templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[str]:
    """Every caption the templates can make, one per (template, class): what a tokenizer's vocabulary is built from."""
    _check_templates(templates)
    return [t.format(name) for t in templates for name in CLASS_NAMES]


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(train_images, train_labels, test_images, test_labels); images (N, 1, 8, 8) in [0, 1], stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_probability("test_fraction", test_fraction, low_open=True, high_open=True)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(range(len(labels)), test_size=test_fraction, random_state=seed, stratify=digits.target)
    return images[tr], labels[tr], images[te], labels[te]


def captions(labels: torch.Tensor, templates: tuple[str, ...], generator: torch.Generator) -> list[str]:
    """One caption per label (0..9), each from a template drawn at random with `generator`."""
    check_tensor("labels", labels, dim=1, integer=True)
    check_instance("generator", generator, torch.Generator)
    _check_templates(templates)
    picks = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
    return [templates[t].format(CLASS_NAMES[y]) for t, y in zip(picks, labels.tolist(), strict=True)]


def digit_prompts(per_digit: int, template: str = EVAL_TEMPLATE) -> tuple[list[str], torch.Tensor]:
    """`per_digit` captions for each digit 0..9, digit-major, and their labels."""
    check_positive_int("per_digit", per_digit)
    _check_templates((template,))
    labels = torch.arange(10).repeat_interleave(per_digit)
    return [template.format(CLASS_NAMES[y]) for y in labels.tolist()], labels

"""The captioned digits of impl.data (the one home CLIP, GLIDE and unCLIP load them from): the split equals
scikit-learn's own stratified split of load_digits, captions follow their templates and labels, and bad input gets
a clear error."""

import pytest
import torch

from impl.data import (
    CLASS_NAMES,
    EVAL_TEMPLATE,
    TRAIN_TEMPLATES,
    UNSEEN_TEMPLATES,
    caption_texts,
    captions,
    digit_prompts,
    load_digits_split,
)


def test_split_equals_sklearns_stratified_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, train_y, test_x, test_y = load_digits_split(0.2, seed=0)
    ref_train_x, ref_test_x, ref_train_y, ref_test_y = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    torch.testing.assert_close(train_x[:, 0] * 16, torch.tensor(ref_train_x, dtype=torch.float32), atol=0, rtol=0)
    torch.testing.assert_close(test_x[:, 0] * 16, torch.tensor(ref_test_x, dtype=torch.float32), atol=0, rtol=0)
    assert test_y.tolist() == ref_test_y.tolist() and train_y.tolist() == ref_train_y.tolist()
    assert train_x.min() == 0 and train_x.max() == 1
    other = load_digits_split(0.2, seed=1)[3]
    assert other.tolist() != test_y.tolist()  # negative control: the seed picks the split


def test_captions_follow_their_labels_and_templates():
    labels = torch.tensor([3, 7, 0, 9])
    texts = captions(labels, TRAIN_TEMPLATES, torch.Generator().manual_seed(0))
    for text, y in zip(texts, labels.tolist(), strict=True):
        assert text in {t.format(CLASS_NAMES[y]) for t in TRAIN_TEMPLATES}
    assert texts == captions(labels, TRAIN_TEMPLATES, torch.Generator().manual_seed(0))
    assert not set(UNSEEN_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert len(caption_texts()) == len(TRAIN_TEMPLATES) * 10
    prompts, prompt_labels = digit_prompts(2)
    assert prompts[:3] == [EVAL_TEMPLATE.format("zero")] * 2 + [EVAL_TEMPLATE.format("one")]
    assert prompt_labels.tolist() == [y for y in range(10) for _ in range(2)]


def test_bad_input_gets_a_clear_error():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"test_fraction must be .*\(0, 1\).*got 1.0"):
        load_digits_split(1.0)
    with pytest.raises(TypeError, match="labels must be an integer tensor, got torch.float32"):
        captions(torch.zeros(3), TRAIN_TEMPLATES, g)
    with pytest.raises(ValueError, match="templates must be a non-empty tuple of strings holding"):
        captions(torch.zeros(3, dtype=torch.long), ("no slot",), g)
    with pytest.raises(TypeError, match="generator must be Generator, got int"):
        captions(torch.zeros(3, dtype=torch.long), TRAIN_TEMPLATES, 0)
    with pytest.raises(ValueError, match="per_digit must be a positive int, got 0"):
        digit_prompts(0)

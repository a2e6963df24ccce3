"""CLIP on scikit-learn's digits: the seeded default run classifies held-out digits zero-shot, with the training
templates and with templates it never saw; the model, tokenizer and CLI check their input."""

import pytest
import torch

from impl.clip import CLIP, CLIPConfig, WordTokenizer, zero_shot_accuracy
from impl.clip.train import TrainConfig, confusion_figure, main, train
from impl.data import CLASS_NAMES, TRAIN_TEMPLATES, UNSEEN_TEMPLATES, load_digits_split


@pytest.fixture(scope="module")
def trained():
    return train(TrainConfig())


@pytest.mark.slow
def test_default_training_classifies_held_out_digits_zero_shot(trained):
    assert trained.accuracy >= 0.90
    assert trained.confusion.sum() == 360 and trained.confusion.trace() / 360 == pytest.approx(trained.accuracy)
    assert trained.losses[-1] < trained.losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("template", [*UNSEEN_TEMPLATES, "ensemble"])
def test_zero_shot_on_templates_never_seen_in_training(trained, template):
    assert not set(UNSEEN_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert trained.unseen_accuracy[template] >= 0.90


def test_untrained_model_is_near_chance_and_wrong_names_break_it(trained):
    """Negative controls: the same evaluation of an untrained model, or of the trained one with the class names
    shifted by one, must not score."""
    _, _, test_x, test_y = load_digits_split()
    torch.manual_seed(0)
    untrained = CLIP(CLIPConfig(vocab_size=len(trained.tokenizer)))
    assert zero_shot_accuracy(untrained, trained.tokenizer, test_x, test_y, TRAIN_TEMPLATES)[0] < 0.3
    shifted = zero_shot_accuracy(trained.model, trained.tokenizer, test_x, (test_y + 1) % 10, TRAIN_TEMPLATES)[0]
    assert shifted < 0.1


def test_training_is_deterministic_under_a_seed():
    config = dict(epochs=1, model=CLIPConfig(layers=1, channels=8, width=32, embed_dim=16))
    a = train(TrainConfig(**config))
    b = train(TrainConfig(**config))
    assert a.losses == b.losses
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_tokenizer_maps_unknown_words_and_pads():
    tok = WordTokenizer(["a digit three", "A digit four"])
    assert tok.vocab == ["<pad>", "<unk>", "<eot>", "a", "digit", "four", "three"]
    assert tok.encode(["a Digit seven"], 6).tolist() == [[3, 4, 1, 2, 0, 0]]
    with pytest.raises(ValueError, match=r"texts must fit context_length=3 with <eot>, got 'a digit three'"):
        tok.encode(["a digit three"], 3)


def test_model_rejects_bad_input():
    model = CLIP(CLIPConfig(vocab_size=10, context_length=5))
    tokens = torch.tensor([[3, 4, 2, 0, 0]] * 2)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, H, W\), got \(2, 8, 8\)"):
        model.encode_image(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T<=5\), got \(2, 6\)"):
        model.encode_text(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must hold an <eot> token in every row"):
        model.encode_text(torch.tensor([[3, 4, 2, 0, 0], [3, 4, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"tokens must have the batch size of images \(3\), got 2"):
        model(torch.rand(3, 1, 8, 8), tokens)
    with pytest.raises(ValueError, match="width must be divisible by heads=3, got 64"):
        CLIPConfig(heads=3)


def test_logit_scale_is_clamped_at_100():
    model = CLIP(CLIPConfig(vocab_size=10))
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(100.0)


def test_cli_help_and_a_short_run(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--epochs" in capsys.readouterr().out
    assert main(["--epochs", "1", "--batch-size", "128", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "zero-shot accuracy, held-out split, training templates" in out and "unseen template" in out
    assert (tmp_path / "confusion.png").stat().st_size > 0


def test_confusion_figure_is_an_image():
    image = confusion_figure(torch.eye(len(CLASS_NAMES), dtype=torch.long) * 3)
    assert image.mode == "RGB" and min(image.size) > 100


@pytest.mark.parametrize(
    ("field", "value"), [("epochs", 0), ("batch_size", -1), ("test_fraction", 1.0)], ids=["epochs", "batch", "split"]
)
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        TrainConfig(**{field: value})

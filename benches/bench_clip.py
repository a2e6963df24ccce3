"""CLIP on scikit-learn's digits: what a training step costs per batch size, and what the trained model gets right.

- clip-train-step: one AdamW step of the small CLIP (CNN image tower, 2-block text transformer) on `batch_size`
  image-caption pairs; throughput in images/s and the peak memory of the step (the first call, so AdamW's state
  is in it). The contrastive logits are (batch, batch), so the loss's share grows with the square of the batch.
- clip-zero-shot: zero-shot classification of the 360 held-out digits with the model trained once by
  `impl.clip.train_clip` (seeded; fewer epochs at --size smoke). `accuracy` uses the training templates (prompt
  ensemble), `unseen_*` templates never used for a training caption. The picture is the confusion matrix.
- clip-loss: forward and backward of the contrastive loss alone on (batch, 64) embeddings, ours against the
  computation of transformers' `CLIPModel.forward` (normalize, scale, `image_text_contrastive_loss`) as reference.
  Both rows record their error against that reference's gradients (image, text, logit scale) on the same
  inputs; without transformers the reference row is skipped and ours runs unchecked.
"""

import pytest
import torch

from impl.clip import CLIP, CLIPConfig, CLIPTrainConfig, clip_loss, train_clip, zero_shot_accuracy
from impl.clip.train import confusion_figure
from impl.data import TRAIN_TEMPLATES, UNSEEN_TEMPLATES, captions, load_digits_split

SWEEPS = {"batch_size": {"smoke": [32, 128], "small": [16, 32, 64, 128, 256, 512], "full": [32, 128, 512, 1024]}}
LOSS_PROVIDERS = ("ours", "transformers")
EPOCHS = {"smoke": 4, "small": 15, "full": 15}


@pytest.fixture(scope="module")
def trained(size, device):
    return train_clip(CLIPTrainConfig(epochs=EPOCHS[size], device=str(device)))


@pytest.mark.benchmark(group="clip-train-step")
def test_train_step(bench, trained, device, batch_size):
    train_x, train_y, _, _ = load_digits_split()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(len(train_y), (batch_size,), generator=g)
    tokenizer = trained.tokenizer
    config = CLIPConfig(vocab_size=len(tokenizer))
    tokens = tokenizer.encode(captions(train_y[rows], TRAIN_TEMPLATES, g), config.context_length).to(device)
    images = train_x[rows].to(device)
    torch.manual_seed(0)
    model = CLIP(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = model(images, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale()
        return loss

    bench(
        step,
        variant="ours",
        params=dict(batch_size=batch_size),
        sweep="batch_size",
        dtype=torch.float32,
        baseline=True,
        items=batch_size,
        items_unit="images/s",
        metrics=dict(parameters=sum(p.numel() for p in model.parameters()), zero_shot_accuracy=trained.accuracy),
        plot=("throughput",),
    )


@pytest.mark.benchmark(group="clip-zero-shot")
def test_zero_shot(bench, trained, size):
    _, _, test_x, test_y = load_digits_split()
    model, tokenizer = trained.model, trained.tokenizer
    unseen = {"unseen_" + t.removesuffix(" {}").replace(" ", "_"): acc for t, acc in trained.unseen_accuracy.items()}
    bench(
        lambda: zero_shot_accuracy(model, tokenizer, test_x, test_y, TRAIN_TEMPLATES),
        variant="ours",
        params=dict(images=len(test_y), epochs=EPOCHS[size], templates=len(TRAIN_TEMPLATES)),
        dtype=torch.float32,
        baseline=True,
        items=len(test_y),
        items_unit="images/s",
        metrics=dict(accuracy=trained.accuracy, **unseen, final_loss=trained.losses[-1]),
    )
    title = f"CLIP zero-shot, held-out digits: {trained.accuracy:.1%} ({len(UNSEEN_TEMPLATES)} unseen templates: "
    title += f"{unseen['unseen_ensemble']:.1%})"
    bench.save_image("clip_zero_shot_confusion", confusion_figure(trained.confusion, title))


def _transformers_loss(image_embeds, text_embeds, logit_scale):
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    return image_text_contrastive_loss(text_embeds @ image_embeds.t() * logit_scale.exp())


@pytest.mark.benchmark(group="clip-loss")
@pytest.mark.parametrize("provider", LOSS_PROVIDERS)
def test_loss(bench, device, provider, batch_size):
    if provider == "transformers":
        pytest.importorskip("transformers", reason="transformers is the reference provider; it is not installed")
    g = torch.Generator(device=device).manual_seed(batch_size)
    image = torch.randn(batch_size, 64, generator=g, device=device).requires_grad_()
    text = torch.randn(batch_size, 64, generator=g, device=device).requires_grad_()
    scale = torch.tensor(2.66, device=device, requires_grad=True)
    loss_fn = clip_loss if provider == "ours" else _transformers_loss

    def forward_backward(loss_fn=loss_fn):
        loss = loss_fn(image, text, scale)
        return torch.autograd.grad(loss, (image, text, scale))

    try:
        expected = forward_backward(_transformers_loss)
    except ImportError:
        expected = None  # no reference to check ours against

    bench(
        forward_backward,
        variant=provider,
        params=dict(batch_size=batch_size, dim=64),
        sweep="batch_size",
        dtype=torch.float32,
        reference=provider == "transformers",
        baseline=provider == "transformers",
        items=batch_size,
        items_unit="pairs/s",
        metrics=dict(logits_bytes=batch_size * batch_size * 4),  # the (B, B) fp32 logits
        expected=expected,
    )

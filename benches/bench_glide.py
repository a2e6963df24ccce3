"""GLIDE on scikit-learn's digits: what a training step costs, and how often a sample shows the digit its caption
asks for, judged by an SVM fitted on real digits (impl.diffusion.digits.DigitJudge; its accuracy on real held-out
digits, `judge_ceiling`, is the most any generator can score).

- glide-train-step: one AdamW step of the default model (caption transformer + UNet) on `batch_size` digits:
  images/s and peak memory.
- glide-guidance: 10 captions x `per_digit` samples ("a hand written number three"), DDIM 25 steps, by
  classifier-free guidance scale (0 = unconditional, 1 = conditional). `ddim` is ours (no x0 clamping);
  `ddim-x0-clamped` is the same model sampled with clip_sample=True, the way diffusers' DDIM clamps (eps kept):
  with the cosine schedule it falls apart as guidance grows. Target (issue): >= 80% with guidance.
- glide-clip-guidance: the unconditional model (caption dropped) steered by the gradient of the CLIP similarity
  (the CLIP of impl.clip, trained here with its defaults), by CLIP guidance scale.
- glide-sampling: sampling time and accuracy against the number of steps, DDPM against DDIM, guidance 3.
The model is trained once per run (seeded; fewer steps at --size smoke, where the accuracies mean nothing).
"""

import dataclasses

import pytest
import torch

from impl.clip import CLIPTrainConfig, train_clip
from impl.data import TRAIN_TEMPLATES, captions, digit_prompts, load_digits_split
from impl.diffusion import glide
from impl.diffusion.digits import DigitJudge, image_grid, to_model_space
from impl.diffusion.loops import diffusion_loss, make_scheduler

SWEEPS = {
    "batch_size": {"smoke": [32], "small": [32, 128, 512], "full": [128, 512, 2048]},
    "guidance_scale": {"smoke": [0.0, 3.0], "small": [0.0, 1.0, 2.0, 3.0, 5.0], "full": [0.0, 1.0, 2.0, 3.0, 5.0]},
    "clip_guidance_scale": {"smoke": [10.0], "small": [3.0, 10.0, 30.0], "full": [3.0, 10.0, 30.0]},
    "num_inference_steps": {"smoke": [5], "small": [5, 10, 25, 50], "full": [10, 25, 50, 100, 250]},
}
TRAIN_STEPS = {"smoke": 30, "small": 1500, "full": 3000}  # small: the default
CLIP_EPOCHS = {"smoke": 2, "small": 15, "full": 15}
PER_DIGIT = {"smoke": 2, "small": 10, "full": 50}
SAMPLE_STEPS, GUIDANCE, TARGET = 25, 3.0, 0.8

# The first test that needs the trained models also pays for training GLIDE and the guiding CLIP (minutes on a CPU).
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def trained(size, device) -> glide.Glide:
    return glide.train(glide.TrainConfig(steps=TRAIN_STEPS[size], device=str(device)))


@pytest.fixture(scope="module")
def judge() -> DigitJudge:
    return DigitJudge()


def _grid(images: torch.Tensor, per_digit: int) -> torch.Tensor:
    """Digit-major samples -> a grid of 10 rows (one per digit) and at most 10 columns."""
    cols = min(per_digit, 10)
    return image_grid(images.view(10, per_digit, 1, 8, 8)[:, :cols].flatten(0, 1), rows=10)


def _accuracy_metrics(judge: DigitJudge, images: torch.Tensor, labels: torch.Tensor) -> dict:
    accuracy = judge.accuracy(images, labels)
    return {"accuracy": accuracy, "judge_ceiling": judge.test_accuracy}


@pytest.mark.benchmark(group="glide-train-step")
def test_train_step(bench, device, batch_size):
    train_x, train_y, _, _ = load_digits_split()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(len(train_y), (batch_size,), generator=g)
    tokenizer = glide.make_tokenizer()
    config = glide.GlideConfig(vocab_size=len(tokenizer))
    tokens = tokenizer.encode(captions(train_y[rows], TRAIN_TEMPLATES, g), config.context_length).to(device)
    x0 = to_model_space(train_x[rows]).to(device)
    torch.manual_seed(0)
    model = glide.GlideModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = make_scheduler("ddpm", beta_schedule="squaredcos_cap_v2")

    def step():
        loss = diffusion_loss(lambda x_t, t: model(x_t, t, tokens), scheduler, x0, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
        metrics=dict(parameters=sum(p.numel() for p in model.parameters())),
        plot=("throughput",),
    )


@pytest.mark.benchmark(group="glide-guidance")
@pytest.mark.parametrize("variant", ["ddim", "ddim-x0-clamped"])
def test_guidance(bench, trained, judge, size, variant, guidance_scale):
    texts, labels = digit_prompts(PER_DIGIT[size])
    model = trained
    if variant == "ddim-x0-clamped":
        model = dataclasses.replace(trained, schedule={**trained.schedule, "clip_sample": True})

    def fn():
        return glide.sample(model, texts, guidance_scale=guidance_scale, num_inference_steps=SAMPLE_STEPS,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip

    images = fn()
    metrics = _accuracy_metrics(judge, images, labels)
    if variant == "ddim" and guidance_scale > 1:
        metrics[f"target >= {TARGET:g}"] = "met" if metrics["accuracy"] >= TARGET else "missed"
    bench(
        fn,
        variant=variant,
        params=dict(
            guidance_scale=guidance_scale, samples=len(texts), steps=SAMPLE_STEPS, train_steps=TRAIN_STEPS[size]
        ),
        sweep="guidance_scale",
        dtype=torch.float32,
        baseline=variant == "ddim",
        items=len(texts),
        items_unit="images/s",
        metrics=metrics,
        plot=("accuracy",),
    )
    if (variant == "ddim" and guidance_scale in (0.0, 1.0, 3.0)) or (variant != "ddim" and guidance_scale == 3.0):
        bench.save_image(f"glide_{variant}_guidance_{guidance_scale:g}", _grid(images, PER_DIGIT[size]))


@pytest.fixture(scope="module")
def clip(size, device):
    return train_clip(CLIPTrainConfig(epochs=CLIP_EPOCHS[size], device=str(device)))


@pytest.mark.benchmark(group="glide-clip-guidance")
def test_clip_guidance(bench, trained, clip, judge, size, clip_guidance_scale):
    texts, labels = digit_prompts(PER_DIGIT[size])

    def fn():
        return glide.sample(trained, texts, guidance_scale=0.0, clip=clip.model, clip_tokenizer=clip.tokenizer,
                            clip_guidance_scale=clip_guidance_scale, num_inference_steps=SAMPLE_STEPS,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip

    images = fn()
    bench(
        fn,
        variant="clip-guided, no caption",
        params=dict(clip_guidance_scale=clip_guidance_scale, samples=len(texts), steps=SAMPLE_STEPS),
        sweep="clip_guidance_scale",
        dtype=torch.float32,
        baseline=True,
        items=len(texts),
        items_unit="images/s",
        metrics=dict(**_accuracy_metrics(judge, images, labels), clip_zero_shot_accuracy=clip.accuracy),
        plot=("accuracy",),
    )
    if clip_guidance_scale == 10.0:
        bench.save_image(f"glide_clip_guidance_{clip_guidance_scale:g}", _grid(images, PER_DIGIT[size]))


@pytest.mark.benchmark(group="glide-sampling")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_steps(bench, trained, judge, size, sampler, num_inference_steps):
    texts, labels = digit_prompts(PER_DIGIT[size])

    def fn():
        return glide.sample(trained, texts, guidance_scale=GUIDANCE, num_inference_steps=num_inference_steps,
                            sampler=sampler, generator=torch.Generator().manual_seed(0))  # fmt: skip

    images = fn()
    bench(
        fn,
        variant=sampler,
        params=dict(num_inference_steps=num_inference_steps, samples=len(texts), guidance_scale=GUIDANCE),
        sweep="num_inference_steps",
        dtype=torch.float32,
        baseline=sampler == "ddpm",
        items=len(texts),
        items_unit="images/s",
        metrics=_accuracy_metrics(judge, images, labels),
        plot=("throughput", "accuracy"),
    )

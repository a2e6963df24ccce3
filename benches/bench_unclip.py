"""DALL-E 2 (unCLIP) on scikit-learn's digits, on the frozen CLIP of impl.clip: what a training step of the prior
and of the decoder costs, how often text-to-image samples and variations show the right digit (judged by an SVM
fitted on real digits; `judge_ceiling` is its accuracy on real held-out digits), and CLIP similarity.

- unclip-train-step: one AdamW step of the prior (a Transformer over four tokens of CLIP embeddings) and of the
  decoder (the UNet conditioned on a CLIP image embedding), by batch size: items/s and peak memory.
- unclip-samples: 10 captions x `per_digit` samples through prior then decoder (DDIM), by decoder guidance
  scale; `clip_similarity` is the mean cosine between CLIP's embeddings of sample and caption, beside the same
  figure for real held-out digits with their own caption (`clip_similarity_real`) and with another digit's
  caption (`clip_similarity_wrong_caption`). Target (issue): >= 70%.
- unclip-variations: the CLIP embedding of one held-out image per digit decoded 8 times (DDIM eta = 1): does the
  digit survive? The picture shows each input, then its variations.
- unclip-sampling: text-to-image time and accuracy against the number of steps, DDPM against DDIM.
CLIP, prior and decoder are trained once per run (seeded; far fewer steps at --size smoke, where the accuracies
mean nothing).
"""

import pytest
import torch

from impl.clip import CLIPTrainConfig, train_clip
from impl.data import CLASS_NAMES, EVAL_TEMPLATE, digit_prompts, load_digits_split
from impl.diffusion import unclip
from impl.diffusion.digits import DigitJudge, image_grid, to_model_space
from impl.diffusion.loops import diffusion_loss, make_scheduler

SWEEPS = {
    "batch_size": {"smoke": [32], "small": [32, 128, 512], "full": [128, 512, 2048]},
    "decoder_guidance_scale": {"smoke": [3.0], "small": [1.0, 2.0, 3.0, 5.0], "full": [1.0, 2.0, 3.0, 5.0]},
    "num_inference_steps": {"smoke": [5], "small": [5, 10, 25, 50], "full": [10, 25, 50, 100, 250]},
}
TRAIN_STEPS = {"smoke": (30, 30), "small": (1500, 1200), "full": (3000, 2400)}  # (prior, decoder); small: defaults
CLIP_EPOCHS = {"smoke": 2, "small": 15, "full": 15}
PER_DIGIT = {"smoke": 2, "small": 10, "full": 50}
SAMPLE_STEPS, PRIOR_GUIDANCE, DECODER_GUIDANCE, TARGET = 25, 2.0, 3.0, 0.7

# The first test that needs the trained models also pays for training CLIP, prior and decoder (minutes on a CPU).
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def trained(size, device) -> unclip.UnCLIP:
    clip = train_clip(CLIPTrainConfig(epochs=CLIP_EPOCHS[size], device=str(device)))
    prior_steps, decoder_steps = TRAIN_STEPS[size]
    config = unclip.TrainConfig(prior_steps=prior_steps, decoder_steps=decoder_steps, device=str(device))
    return unclip.train(config, clip=clip.model, clip_tokenizer=clip.tokenizer)


@pytest.fixture(scope="module")
def judge() -> DigitJudge:
    return DigitJudge()


@pytest.mark.benchmark(group="unclip-train-step")
@pytest.mark.parametrize("model_name", ["prior", "decoder"])
def test_train_step(bench, trained, device, model_name, batch_size):
    train_x, _, _, _ = load_digits_split()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(len(train_x), (batch_size,), generator=g)
    clip = trained.clip
    with torch.no_grad():
        z = clip.encode_image(train_x[rows].to(device))
    torch.manual_seed(0)
    schedule = trained.schedule
    if model_name == "prior":
        model = unclip.Prior(trained.prior.config).to(device)
        scheduler = make_scheduler("ddpm", **schedule, prediction_type="sample")
        x0, cond = z * clip.config.embed_dim**0.5, z.flip(0)  # any unit text embeddings will do for timing
    else:
        model = unclip.Decoder(trained.decoder.config).to(device)
        scheduler = make_scheduler("ddpm", **schedule)
        x0, cond = to_model_space(train_x[rows]).to(device), z
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = diffusion_loss(lambda x_t, t: model(x_t, t, cond), scheduler, x0, g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    bench(
        step,
        variant=model_name,
        params=dict(batch_size=batch_size),
        sweep="batch_size",
        dtype=torch.float32,
        baseline=model_name == "decoder",
        items=batch_size,
        items_unit="items/s",
        metrics=dict(parameters=sum(p.numel() for p in model.parameters())),
        plot=("throughput",),
    )


@pytest.mark.benchmark(group="unclip-samples")
def test_text_to_image(bench, trained, judge, size, decoder_guidance_scale):
    texts, labels = digit_prompts(PER_DIGIT[size])
    _, _, test_x, test_y = load_digits_split()

    def fn():
        return unclip.sample(trained, texts, prior_guidance_scale=PRIOR_GUIDANCE,
                             decoder_guidance_scale=decoder_guidance_scale, num_inference_steps=SAMPLE_STEPS,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip

    images = fn()
    accuracy = judge.accuracy(images, labels)
    metrics = dict(
        accuracy=accuracy,
        judge_ceiling=judge.test_accuracy,
        clip_similarity=unclip.clip_similarity(trained, images, texts),
        clip_similarity_real=unclip.clip_similarity(
            trained, test_x, [EVAL_TEMPLATE.format(CLASS_NAMES[y]) for y in test_y.tolist()]
        ),
        clip_similarity_wrong_caption=unclip.clip_similarity(
            trained, test_x, [EVAL_TEMPLATE.format(CLASS_NAMES[(y + 1) % 10]) for y in test_y.tolist()]
        ),
    )
    metrics[f"target >= {TARGET:g}"] = "met" if accuracy >= TARGET else "missed"
    bench(
        fn,
        variant="prior + decoder",
        params=dict(
            decoder_guidance_scale=decoder_guidance_scale, prior_guidance_scale=PRIOR_GUIDANCE, steps=SAMPLE_STEPS
        ),
        sweep="decoder_guidance_scale",
        dtype=torch.float32,
        baseline=True,
        items=len(texts),
        items_unit="images/s",
        metrics=metrics,
        plot=("accuracy", "clip_similarity"),
    )
    if decoder_guidance_scale == DECODER_GUIDANCE:
        cols = min(PER_DIGIT[size], 10)
        grid = images.view(10, PER_DIGIT[size], 1, 8, 8)[:, :cols].flatten(0, 1)
        bench.save_image(f"unclip_samples_guidance_{decoder_guidance_scale:g}", image_grid(grid, rows=10))


@pytest.mark.benchmark(group="unclip-variations")
def test_variations(bench, trained, judge):
    _, _, test_x, test_y = load_digits_split()
    inputs = torch.stack([test_x[test_y == d][0] for d in range(10)])  # one held-out image per digit
    per_image = 8

    def fn():
        return unclip.variations(trained, inputs, per_image=per_image, eta=1.0, guidance_scale=DECODER_GUIDANCE,
                                 num_inference_steps=SAMPLE_STEPS,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip

    images = fn()
    labels = torch.arange(10).repeat_interleave(per_image)
    bench(
        fn,
        variant="variations",
        params=dict(inputs=10, per_image=per_image, decoder_guidance_scale=DECODER_GUIDANCE, steps=SAMPLE_STEPS),
        dtype=torch.float32,
        items=len(labels),
        items_unit="images/s",
        metrics=dict(accuracy=judge.accuracy(images, labels), judge_ceiling=judge.test_accuracy),
    )
    rows = torch.cat([inputs[:, None], images.view(10, per_image, 1, 8, 8).cpu()], dim=1)  # the input, its variations
    bench.save_image("unclip_variations", image_grid(rows.flatten(0, 1), rows=10))


@pytest.mark.benchmark(group="unclip-sampling")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_steps(bench, trained, judge, size, sampler, num_inference_steps):
    texts, labels = digit_prompts(PER_DIGIT[size])

    def fn():
        return unclip.sample(trained, texts, prior_guidance_scale=PRIOR_GUIDANCE,
                             decoder_guidance_scale=DECODER_GUIDANCE, num_inference_steps=num_inference_steps,
                             sampler=sampler, generator=torch.Generator().manual_seed(0))  # fmt: skip

    images = fn()
    bench(
        fn,
        variant=sampler,
        params=dict(num_inference_steps=num_inference_steps, samples=len(texts)),
        sweep="num_inference_steps",
        dtype=torch.float32,
        baseline=sampler == "ddpm",
        items=len(texts),
        items_unit="images/s",
        metrics=dict(accuracy=judge.accuracy(images, labels), judge_ceiling=judge.test_accuracy),
        plot=("throughput", "accuracy"),
    )

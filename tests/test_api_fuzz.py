"""Every public function of the library areas, fed wrong types and values argument by argument.

Each row is (function, the argument it gets wrong, a call that passes everything else right). The call must raise
a ValueError or TypeError whose message names that argument and says what came in ("got ..."), never an
IndexError, ZeroDivisionError, OverflowError, a numpy or torch internal error, or a silently wrong result.
The rows marked "issue 19" are the reproducers of items 16 and 17 of that issue.
"""

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from impl.attention import attention, flash_attention_torch, naive_attention
from impl.clip import CLIPConfig, clip_loss, nt_xent_loss
from impl.data import document_mask, exact_duplicates, minhash_signatures, near_duplicates, pack_documents
from impl.diffusion import DDIMScheduler, DDPMScheduler, classifier_free_guidance, glide, img2img, unclip
from impl.diffusion.unet import UNetConfig
from impl.finetune import (
    Linear4bit,
    LoRALinear,
    apply_lora,
    apply_qlora,
    merge_lora,
    quantize_nf4,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)
from impl.generation import KVCache, Llama, LlamaConfig, generate
from impl.gpt.model import GPTConfig
from impl.memory import apply_checkpointing, checkpoint, checkpoint_sequential, saved_tensor_bytes
from impl.rlhf import RewardModel, bradley_terry_loss, dpo_loss, gae, ppo_loss
from impl.rlhf.dpo import DPOConfig
from impl.rlhf.losses import kl_penalty
from impl.rlhf.ppo import PPOConfig

NAN = math.nan
VOCAB = 11


@functools.cache
def llama() -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=16,
    )  # fmt: skip
    return Llama(config).eval()


@functools.cache
def tiny_glide() -> glide.Glide:
    tokenizer = glide.make_tokenizer()
    torch.manual_seed(0)
    unet = UNetConfig(channels=8, emb_dim=16, groups=4)
    config = glide.GlideConfig(vocab_size=len(tokenizer), text_width=16, text_layers=1, unet=unet)
    schedule = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    return glide.Glide(glide.GlideModel(config).eval(), tokenizer, schedule, [])


def glide_sample(texts=("a seven",), **kw):
    texts = list(texts) if isinstance(texts, tuple) else texts
    return glide.sample(tiny_glide(), texts, **{"num_inference_steps": 1, **kw})


def ids(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def qkv(head_dim=4, **override):
    t = {name: torch.randn(1, 2, 3, head_dim) for name in "qkv"}
    return {**t, **override}


def gen(**kw):
    return generate(llama(), kw.pop("input_ids", ids([1, 2, 3])), **{"max_new_tokens": 2, **kw})


def ddim_step(timestep=901, eta=0.0):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    return scheduler.step(torch.zeros(1, 4), timestep, torch.zeros(1, 4), eta=eta)


def add_noise(timesteps, batch=2):
    x = torch.zeros(batch, 4)
    return DDPMScheduler().add_noise(x, torch.zeros_like(x), timesteps)


def cfg(timestep=5, guidance_scale=3.0, denoiser=lambda x, t, c: x + c.sum(), uncond=None):
    sample, cond = torch.zeros(2, 4), torch.zeros(2, 3)
    uncond = cond if uncond is None else uncond
    return classifier_free_guidance(denoiser, sample, timestep, cond, uncond, guidance_scale)


def sd_img2img(image=None, prompt="a cat", **kw):
    # The checks run before any component is used: stand-ins that carry only what is read first.
    unet = SimpleNamespace(device=torch.device("cpu"))
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=[4, 4]), dtype=torch.float32)
    image = torch.rand(1, 3, 8, 8) if image is None else image
    return img2img(unet, vae, None, None, DDIMScheduler(), image, prompt, **{"num_inference_steps": 2, **kw})


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])


def lora(**kw):
    return LoRALinear(nn.Linear(4, 4), **{"r": 2, "alpha": 4, **kw})


def pair(n=3):
    return torch.zeros(n), torch.zeros(n)


def ppo(**kw):
    t = torch.zeros(2, 2)
    return ppo_loss(t, t, t, t, t, t, **kw)


CASES = [
    # attention
    ("attention head_dim 0 (issue 19)", lambda: attention(**qkv(head_dim=0)), "head_dim"),
    ("attention q list", lambda: attention(**qkv(q=[1.0])), "q"),
    ("attention k int", lambda: attention(**qkv(k=torch.ones(1, 2, 3, 4, dtype=torch.long))), "k"),
    ("attention scale nan", lambda: attention(**qkv(), scale=NAN), "scale"),
    ("attention scale str", lambda: attention(**qkv(), scale="1"), "scale"),
    ("attention scale bool", lambda: attention(**qkv(), scale=True), "scale"),
    ("attention scale inf", lambda: attention(**qkv(), scale=math.inf), "scale"),
    ("attention causal str", lambda: attention(**qkv(), causal="yes"), "causal"),
    ("attention backend", lambda: attention(**qkv(), backend="flash"), "backend"),
    ("naive head_dim 0", lambda: naive_attention(**qkv(head_dim=0)), "head_dim"),
    ("tiled block_q 0", lambda: flash_attention_torch(**qkv(), block_q=0), "block_q"),
    ("tiled block_k float", lambda: flash_attention_torch(**qkv(), block_k=2.0), "block_k"),
    # generation
    ("generate id >= vocab (issue 19)", lambda: gen(input_ids=ids([1, VOCAB])), "input_ids"),
    ("generate negative id (issue 19)", lambda: gen(input_ids=ids([1, -1])), "input_ids"),
    ("generate float ids", lambda: gen(input_ids=torch.zeros(1, 3)), "input_ids"),
    ("generate ids list", lambda: gen(input_ids=[[1, 2]]), "input_ids"),
    ("generate temperature nan (issue 19)", lambda: gen(temperature=NAN), "temperature"),
    ("generate temperature str", lambda: gen(temperature="1"), "temperature"),
    ("generate temperature negative", lambda: gen(temperature=-1.0), "temperature"),
    ("generate eos str (issue 19)", lambda: gen(eos_token_id="x"), "eos_token_id"),
    ("generate eos >= vocab", lambda: gen(eos_token_id=VOCAB), "eos_token_id"),
    ("generate eos negative", lambda: gen(eos_token_id=-1), "eos_token_id"),
    ("generate max_new_tokens 0", lambda: gen(max_new_tokens=0), "max_new_tokens"),
    ("generate max_new_tokens float", lambda: gen(max_new_tokens=2.0), "max_new_tokens"),
    ("generate max_new_tokens bool", lambda: gen(max_new_tokens=True), "max_new_tokens"),
    ("generate top_k 0", lambda: gen(temperature=1.0, top_k=0), "top_k"),
    ("generate top_k float", lambda: gen(temperature=1.0, top_k=1.5), "top_k"),
    ("generate top_p nan", lambda: gen(temperature=1.0, top_p=NAN), "top_p"),
    ("generate top_p 0", lambda: gen(temperature=1.0, top_p=0.0), "top_p"),
    ("generate use_cache str", lambda: gen(use_cache="no"), "use_cache"),
    ("generate generator int", lambda: gen(temperature=1.0, generator=0), "generator"),
    ("generate mask shape", lambda: gen(attention_mask=torch.ones(1, 2)), "attention_mask"),
    ("Llama forward float ids", lambda: llama()(torch.zeros(1, 2)), "input_ids"),
    ("generate model", lambda: generate(nn.Linear(2, 2), ids([1]), max_new_tokens=1), "model"),
    ("LlamaConfig vocab_size 0", lambda: LlamaConfig(vocab_size=0), "vocab_size"),
    ("LlamaConfig hidden_size float", lambda: LlamaConfig(hidden_size=8.0), "hidden_size"),
    ("KVCache layers 0", lambda: KVCache(layers=0, batch=1, kv_heads=1, max_tokens=4, head_dim=2), "layers"),
    # data
    ("pack id over int64 (issue 19)", lambda: pack_documents([[2**70]], 4), "docs[0]"),
    ("pack str tokens (issue 19)", lambda: pack_documents([["a", "b"]], 4), "docs[0]"),
    ("pack nested lists (issue 19)", lambda: pack_documents([[[1, 2]]], 4), "docs[0]"),
    ("pack float tokens (issue 19)", lambda: pack_documents([[1.7, 2]], 4), "docs[0]"),
    ("pack negative tokens (issue 19)", lambda: pack_documents([[3, -1]], 4), "docs[0]"),
    ("pack bool tokens", lambda: pack_documents([[True, 2]], 4), "docs[0]"),
    ("pack float tensor", lambda: pack_documents([torch.tensor([1.5, 2.0])], 4), "docs[0]"),
    ("pack docs str", lambda: pack_documents("abc", 4), "docs"),
    ("pack empty doc", lambda: pack_documents([[1], []], 4), "docs[1]"),
    ("pack seq_len 0", lambda: pack_documents([[1]], 0), "seq_len"),
    ("pack seq_len float", lambda: pack_documents([[1]], 4.0), "seq_len"),
    ("pack strategy", lambda: pack_documents([[1]], 4, "best"), "strategy"),
    ("pack long_docs", lambda: pack_documents([[1]], 4, long_docs="drop"), "long_docs"),
    ("pack pad_id float", lambda: pack_documents([[1]], 4, pad_id=0.5), "pad_id"),
    ("document_mask list", lambda: document_mask([[0, 0]]), "document_ids"),
    ("document_mask float", lambda: document_mask(torch.zeros(1, 2)), "document_ids"),
    ("document_mask 1-D", lambda: document_mask(torch.zeros(2, dtype=torch.long)), "document_ids"),
    ("exact_duplicates str", lambda: exact_duplicates("abc"), "docs"),
    ("exact_duplicates int doc", lambda: exact_duplicates(["a", 1]), "docs[1]"),
    ("minhash num_perm 0", lambda: minhash_signatures(["a"], num_perm=0), "num_perm"),
    ("minhash ngram float", lambda: minhash_signatures(["a"], ngram=2.0), "ngram"),
    ("near_duplicates threshold nan", lambda: near_duplicates(["a"], threshold=NAN), "threshold"),
    ("near_duplicates threshold 0", lambda: near_duplicates(["a"], threshold=0), "threshold"),
    ("near_duplicates bands 0", lambda: near_duplicates(["a"], bands=0), "bands"),
    ("near_duplicates bands 7", lambda: near_duplicates(["a"], bands=7), "bands"),
    # diffusion
    ("DDPM T float (issue 19)", lambda: DDPMScheduler(num_train_timesteps=1000.0), "num_train_timesteps"),
    ("DDPM T str (issue 19)", lambda: DDPMScheduler(num_train_timesteps="1000"), "num_train_timesteps"),
    ("DDPM T 0", lambda: DDPMScheduler(num_train_timesteps=0), "num_train_timesteps"),
    ("DDPM beta_schedule", lambda: DDPMScheduler(beta_schedule="cosine"), "beta_schedule"),
    ("DDPM beta_end nan", lambda: DDPMScheduler(beta_end=NAN), "beta_end"),
    ("DDPM clip_sample str", lambda: DDPMScheduler(clip_sample="no"), "clip_sample"),
    ("DDIM set_timesteps bool (issue 19)", lambda: DDIMScheduler().set_timesteps(True), "num_inference_steps"),
    ("DDIM set_timesteps float", lambda: DDIMScheduler().set_timesteps(10.0), "num_inference_steps"),
    ("DDIM set_timesteps 0", lambda: DDIMScheduler().set_timesteps(0), "num_inference_steps"),
    ("DDIM step eta str (issue 19)", lambda: ddim_step(eta="0.5"), "eta"),
    ("DDIM step eta nan", lambda: ddim_step(eta=NAN), "eta"),
    ("DDIM step timestep 900.7 (issue 19)", lambda: ddim_step(timestep=900.7), "timestep"),
    ("DDIM step timestep tensor 900.7", lambda: ddim_step(timestep=torch.tensor(900.7)), "timestep"),
    ("DDIM step timestep two values", lambda: ddim_step(timestep=torch.tensor([901, 801])), "timestep"),
    ("DDIM step timestep 1000", lambda: ddim_step(timestep=1000), "timestep"),
    ("DDIM step timestep bool", lambda: ddim_step(timestep=True), "timestep"),
    ("DDPM step generator int", lambda: DDPMScheduler().step(torch.zeros(1), 5, torch.zeros(1), 0), "generator"),
    ("DDPM step sample list", lambda: DDPMScheduler().step(torch.zeros(1), 5, [0.0]), "sample"),
    ("add_noise t >= T (issue 19)", lambda: add_noise(torch.tensor([1000, 5])), "timesteps"),
    ("add_noise t negative", lambda: add_noise(torch.tensor([-1, 5])), "timesteps"),
    ("add_noise wrong length (issue 19)", lambda: add_noise(torch.tensor([1, 2, 3])), "timesteps"),
    ("add_noise one row three t (issue 19)", lambda: add_noise(torch.tensor([1, 2, 3]), batch=1), "timesteps"),
    ("add_noise float t", lambda: add_noise(torch.tensor([1.5, 2.0])), "timesteps"),
    ("add_noise t list", lambda: add_noise([1, 2]), "timesteps"),
    ("add_noise noise shape", lambda: DDPMScheduler().add_noise(torch.zeros(2, 4), torch.zeros(2, 3), ids(1)), "noise"),
    ("cfg timestep length 3 (issue 19)", lambda: cfg(timestep=torch.tensor([1, 2, 3])), "timestep"),
    ("cfg guidance_scale nan", lambda: cfg(guidance_scale=NAN), "guidance_scale"),
    ("cfg guidance_scale str", lambda: cfg(guidance_scale="3"), "guidance_scale"),
    ("cfg denoiser", lambda: cfg(denoiser=None), "denoiser"),
    ("cfg uncond shape", lambda: cfg(uncond=torch.zeros(2, 2)), "uncond"),
    ("img2img 0x0 image (issue 19)", lambda: sd_img2img(image=torch.rand(1, 3, 0, 0)), "image"),
    ("img2img NaN image (issue 19)", lambda: sd_img2img(image=torch.full((1, 3, 8, 8), NAN)), "image"),
    ("img2img prompt None (issue 19)", lambda: sd_img2img(prompt=None), "prompt"),
    ("img2img prompt int", lambda: sd_img2img(prompt=3), "prompt"),
    ("img2img prompt count", lambda: sd_img2img(prompt=["a", "b"]), "prompt"),
    ("img2img negative_prompt int", lambda: sd_img2img(negative_prompt=[1]), "negative_prompt"),
    ("img2img guidance_scale nan (issue 19)", lambda: sd_img2img(guidance_scale=NAN), "guidance_scale"),
    ("img2img strength nan", lambda: sd_img2img(strength=NAN), "strength"),
    ("img2img strength str", lambda: sd_img2img(strength="0.5"), "strength"),
    ("img2img steps float", lambda: sd_img2img(num_inference_steps=2.0), "num_inference_steps"),
    ("img2img eta negative", lambda: sd_img2img(eta=-1.0), "eta"),
    ("img2img output_type", lambda: sd_img2img(output_type="np"), "output_type"),
    ("img2img image str", lambda: sd_img2img(image="cat.png"), "image"),
    ("UNetConfig channels 0", lambda: UNetConfig(channels=0), "channels"),
    ("UNetConfig dropout nan", lambda: UNetConfig(dropout=NAN), "dropout"),
    ("glide texts None", lambda: glide_sample(texts=None), "texts"),
    ("glide texts str", lambda: glide_sample(texts="a seven"), "texts"),
    ("glide guidance_scale nan", lambda: glide_sample(guidance_scale=NAN), "guidance_scale"),
    ("glide clip_guidance_scale str", lambda: glide_sample(clip_guidance_scale="1"), "clip_guidance_scale"),
    ("glide clip missing", lambda: glide_sample(clip_guidance_scale=1.0), "clip_guidance_scale"),
    ("glide steps 0", lambda: glide_sample(num_inference_steps=0), "num_inference_steps"),
    ("glide steps float", lambda: glide_sample(num_inference_steps=1.0), "num_inference_steps"),
    ("glide sampler", lambda: glide_sample(sampler="euler"), "sampler"),
    ("glide eta nan", lambda: glide_sample(eta=NAN), "eta"),
    ("glide generator int", lambda: glide_sample(generator=1), "generator"),
    ("glide progress str", lambda: glide_sample(progress="no"), "progress"),
    ("unclip prior candidates 0", lambda: unclip.sample_prior(None, ["a"], candidates=0), "candidates"),
    ("unclip prior candidates float", lambda: unclip.sample_prior(None, ["a"], candidates=2.0), "candidates"),
    ("unclip prior guidance nan", lambda: unclip.sample_prior(None, ["a"], guidance_scale=NAN), "guidance_scale"),
    ("unclip variations per_image 0", lambda: unclip.variations(None, torch.zeros(1, 1, 8, 8), 0), "per_image"),
    # finetune
    ("quantize_nf4 w list", lambda: quantize_nf4([1.0, 2.0]), "w"),
    ("quantize_nf4 w int", lambda: quantize_nf4(torch.ones(4, dtype=torch.long)), "w"),
    ("quantize_nf4 w empty", lambda: quantize_nf4(torch.ones(0)), "w"),
    ("quantize_nf4 blocksize odd", lambda: quantize_nf4(torch.ones(4), blocksize=3), "blocksize"),
    ("quantize_nf4 blocksize float", lambda: quantize_nf4(torch.ones(4), blocksize=64.0), "blocksize"),
    ("quantize_nf4 blocksize bool", lambda: quantize_nf4(torch.ones(4), blocksize=True), "blocksize"),
    ("quantize_nf4 double_quant str", lambda: quantize_nf4(torch.ones(4), double_quant="yes"), "double_quant"),
    ("LoRALinear r 0", lambda: lora(r=0), "r"),
    ("LoRALinear r too big", lambda: lora(r=5), "r"),
    ("LoRALinear r float", lambda: lora(r=2.0), "r"),
    ("LoRALinear alpha nan", lambda: lora(alpha=NAN), "alpha"),
    ("LoRALinear alpha str", lambda: lora(alpha="4"), "alpha"),
    ("LoRALinear dropout 1", lambda: lora(dropout=1.0), "dropout"),
    ("LoRALinear dropout nan", lambda: lora(dropout=NAN), "dropout"),
    ("LoRALinear base_layer", lambda: LoRALinear(nn.ReLU(), r=1, alpha=1), "base_layer"),
    ("merge_lora model", lambda: merge_lora(None), "model"),
    ("unmerge_lora model", lambda: unmerge_lora("model"), "model"),
    ("trainable_parameters model", lambda: trainable_parameters(None), "model"),
    ("save_adapter model", lambda: save_adapter(None, "unused"), "model"),
    ("apply_lora target missing", lambda: apply_lora(Blocks(), "q_proj", r=1, alpha=1), "target_modules"),
    ("apply_lora r 0", lambda: apply_lora(Blocks(), "0", r=0, alpha=1), "r"),
    ("apply_qlora alpha nan", lambda: apply_qlora(Blocks(), "0", r=1, alpha=NAN), "alpha"),
    ("Linear4bit weight 1-D", lambda: Linear4bit(torch.ones(64)), "weight"),
    ("Linear4bit compute_dtype", lambda: Linear4bit(torch.ones(4, 64), compute_dtype=torch.int8), "compute_dtype"),
    ("Linear4bit bias list", lambda: Linear4bit(torch.ones(4, 64), bias=[0.0] * 4), "bias"),
    ("Linear4bit bias shape", lambda: Linear4bit(torch.ones(4, 64), bias=torch.zeros(3)), "bias"),
    # memory
    ("checkpoint fn", lambda: checkpoint(None, torch.ones(1)), "fn"),
    ("checkpoint_sequential segments 0", lambda: checkpoint_sequential([nn.ReLU()], 0, torch.ones(1)), "segments"),
    ("checkpoint_seq segments float", lambda: checkpoint_sequential([nn.ReLU()], 1.0, torch.ones(2)), "segments"),
    ("checkpoint_sequential layers", lambda: checkpoint_sequential(nn.ReLU(), 1, torch.ones(1)), "layers"),
    ("apply_checkpointing model", lambda: apply_checkpointing(None, "every"), "model"),
    ("apply_checkpointing policy", lambda: apply_checkpointing(Blocks(), "some"), "policy"),
    ("apply_checkpointing k 0", lambda: apply_checkpointing(Blocks(), "every_k", k=0), "k"),
    ("apply_checkpointing k float", lambda: apply_checkpointing(Blocks(), "every_k", k=1.0), "k"),
    ("apply_checkpointing blocks", lambda: apply_checkpointing(Blocks(), "every", blocks="h"), "blocks"),
    ("saved_tensor_bytes exclude int", lambda: saved_tensor_bytes(exclude=5).__enter__(), "exclude"),
    ("saved_tensor_bytes exclude list of str", lambda: saved_tensor_bytes(exclude=["a"]).__enter__(), "exclude"),
    # clip
    ("clip_loss list", lambda: clip_loss([1.0], torch.zeros(2, 3), 1.0), "image_embeds"),
    ("clip_loss shapes", lambda: clip_loss(torch.zeros(2, 3), torch.zeros(3, 3), 1.0), "text_embeds"),
    ("nt_xent temperature 0", lambda: nt_xent_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature"),
    ("nt_xent temperature nan", lambda: nt_xent_loss(torch.zeros(2, 3), torch.zeros(2, 3), NAN), "temperature"),
    ("CLIPConfig embed_dim 0", lambda: CLIPConfig(embed_dim=0), "embed_dim"),
    ("CLIPConfig width float", lambda: CLIPConfig(width=64.0), "width"),
    ("CLIPConfig logit_scale_init nan", lambda: CLIPConfig(logit_scale_init=NAN), "logit_scale_init"),
    # rlhf
    ("RewardModel pool", lambda: RewardModel(GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=4), pool="x"), "pool"),
    ("bradley_terry list", lambda: bradley_terry_loss([0.0], torch.zeros(1)), "chosen_rewards"),
    ("bradley_terry int", lambda: bradley_terry_loss(*pair()[:1], torch.zeros(3, dtype=torch.long)), "rejected"),
    ("dpo beta 0", lambda: dpo_loss(*pair(), *pair(), beta=0), "beta"),
    ("dpo beta nan", lambda: dpo_loss(*pair(), *pair(), beta=NAN), "beta"),
    ("dpo ipo str", lambda: dpo_loss(*pair(), *pair(), ipo="yes"), "ipo"),
    ("gae gamma nan", lambda: gae(torch.zeros(1, 3), torch.zeros(1, 3), gamma=NAN), "gamma"),
    ("gae lam 1.5", lambda: gae(torch.zeros(1, 3), torch.zeros(1, 3), lam=1.5), "lam"),
    ("gae shapes", lambda: gae(torch.zeros(1, 3), torch.zeros(1, 2)), "values"),
    ("ppo clip_range 0", lambda: ppo(clip_range=0), "clip_range"),
    ("ppo vf_coef nan", lambda: ppo(vf_coef=NAN), "vf_coef"),
    ("kl_penalty estimator", lambda: kl_penalty(*pair(), estimator="k2"), "estimator"),
    ("PPOConfig lr nan", lambda: PPOConfig(lr=NAN), "lr"),
    ("PPOConfig lr str", lambda: PPOConfig(lr="1e-3"), "lr"),
    ("PPOConfig gamma 2", lambda: PPOConfig(gamma=2.0), "gamma"),
    ("DPOConfig lr 0", lambda: DPOConfig(lr=0), "lr"),
    ("DPOConfig ipo str", lambda: DPOConfig(ipo="no"), "ipo"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "argument"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_wrong_input_names_the_argument(fn, argument):
    with pytest.raises((ValueError, TypeError)) as caught:
        fn()
    message = str(caught.value)
    assert argument in message, f"{type(caught.value).__name__}: {message!r} does not name {argument!r}"


def test_right_input_still_runs():
    """Negative control: the same helpers with valid arguments succeed, so the rows above fail on the one
    argument they change."""
    assert attention(**qkv()).shape == (1, 2, 3, 4)
    assert gen(eos_token_id=VOCAB - 1).shape[0] == 1
    assert pack_documents([[1, 2], [3]], 4).input_ids.shape[1] == 4
    assert ddim_step(timestep=torch.tensor(901.0)).prev_sample.shape == (1, 4)
    assert add_noise(torch.tensor([999])).shape == (2, 4)
    assert cfg(timestep=torch.tensor([1, 2])).shape == (2, 4)
    assert cfg(timestep=torch.tensor([1])).shape == (2, 4)
    assert lora()(torch.zeros(1, 4)).shape == (1, 4)


def test_nf4_nan_spreads_over_its_block_as_in_bitsandbytes():
    """A NaN weight makes its block's absmax NaN, so the whole 64-value block dequantizes to NaN and the other
    blocks are untouched: bitsandbytes' quantize_4bit does the same and raises nothing, so neither do we."""
    w = torch.randn(256)
    w[70] = NAN
    out = quantize_nf4(w, blocksize=64).dequantize().reshape(-1)
    assert out[64:128].isnan().all()
    assert not out[:64].isnan().any() and not out[128:].isnan().any()


def test_nf4_nan_block_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(256)
    w[70] = NAN
    packed, state = bnb.quantize_4bit(w.reshape(1, -1), blocksize=64, quant_type="nf4")  # raises nothing
    reference = bnb.dequantize_4bit(packed, state).reshape(-1)
    ours = quantize_nf4(w, blocksize=64).dequantize().reshape(-1)
    assert torch.equal(ours.isnan(), reference.isnan())

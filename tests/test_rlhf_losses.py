"""RLHF losses: hand-computed values on small tensors, torch's own losses and KL as live references, bad input.

trl is not installed in the project environment, so its losses are not compared here; the reference for each
loss is the paper's equation worked by hand, and torch where torch has the same function.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.common import tolerance
from impl.gpt import GPT, GPTConfig
from impl.rlhf import RewardModel, bradley_terry_loss, dpo_loss, gae, ppo_loss
from impl.rlhf.losses import exact_kl, kl_penalty
from impl.rlhf.models import completion_logprobs

TOL = tolerance(torch.float32)


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_bradley_terry_hand_computed_and_torch_bce():
    chosen, rejected = _t(1.0, 0.0, -0.5), _t(0.0, 0.0, 0.5)
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, 0.0, -1.0)) / 3  # -log sigmoid(d) = log(1 + e^-d)
    loss = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(loss, torch.tensor(expected), **TOL)
    reference = F.binary_cross_entropy_with_logits(chosen - rejected, torch.ones(3))
    torch.testing.assert_close(loss, reference, **TOL)
    assert not torch.allclose(bradley_terry_loss(chosen + _t(0.1, 0, 0), rejected), reference)  # negative control


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=8), st.lists(st.floats(-5, 5), min_size=8, max_size=8))
def test_bradley_terry_swapping_the_pair_adds_the_margin(a, b):
    """log sigmoid(x) - log sigmoid(-x) = x, so swapping chosen and rejected adds the mean margin."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b[: len(a)], dtype=torch.float64)
    torch.testing.assert_close(bradley_terry_loss(b, a) - bradley_terry_loss(a, b), (a - b).mean())


DPO_INPUTS = dict(  # implicit log-ratio differences (pc - rc) - (pr - rr) = 1.5 and 0.5
    policy_chosen_logps=_t(-1.0, -2.0),
    policy_rejected_logps=_t(-3.0, -2.5),
    ref_chosen_logps=_t(-1.5, -2.0),
    ref_rejected_logps=_t(-2.0, -2.0),
)


def test_dpo_hand_computed_and_torch_bce():
    loss, chosen_rewards, rejected_rewards = dpo_loss(**DPO_INPUTS, beta=0.5)
    expected = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(-0.25))) / 2  # -log sigmoid(beta * 1.5), (* 0.5)
    torch.testing.assert_close(loss, torch.tensor(expected), **TOL)
    torch.testing.assert_close(chosen_rewards, _t(0.25, 0.0), **TOL)  # beta (pc - rc)
    torch.testing.assert_close(rejected_rewards, _t(-0.5, -0.25), **TOL)  # beta (pr - rr)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(0.5 * _t(1.5, 0.5), torch.ones(2)), **TOL)
    perturbed = {**DPO_INPUTS, "policy_chosen_logps": _t(-1.1, -2.0)}
    assert not torch.allclose(dpo_loss(**perturbed, beta=0.5)[0], loss)  # negative control


def test_ipo_hand_computed():
    loss, _, _ = dpo_loss(**DPO_INPUTS, beta=0.5, ipo=True)
    torch.testing.assert_close(loss, torch.tensor(0.25), **TOL)  # ((1.5 - 1)^2 + (0.5 - 1)^2) / 2, 1/(2 beta) = 1
    assert not torch.allclose(dpo_loss(**DPO_INPUTS, beta=0.25, ipo=True)[0], loss)  # target 2 instead: differs


def test_gae_hand_computed():
    rewards, values = _t(0.0, 0.0, 1.0)[None], _t(0.5, 0.2, 0.4)[None]
    advantages, returns = gae(rewards, values, gamma=0.9, lam=0.8)
    # t=2: 1 - 0.4 = 0.6; t=1: (0.9*0.4 - 0.2) + 0.72*0.6 = 0.592; t=0: (0.9*0.2 - 0.5) + 0.72*0.592 = 0.10624
    torch.testing.assert_close(advantages, _t(0.10624, 0.592, 0.6)[None], **TOL)
    torch.testing.assert_close(returns, _t(0.60624, 0.792, 1.0)[None], **TOL)
    assert not torch.allclose(gae(rewards, values, gamma=0.9, lam=0.7)[0], advantages)  # negative control


def test_gae_limits_are_monte_carlo_and_td():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    _, returns = gae(rewards, values, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, rewards.flip(1).cumsum(1).flip(1), **TOL)  # reward to go
    advantages, _ = gae(rewards, values, gamma=0.9, lam=0.0)
    next_values = F.pad(values[:, 1:], (0, 1))
    torch.testing.assert_close(advantages, rewards + 0.9 * next_values - values, **TOL)  # one-step TD error


PPO_INPUTS = dict(
    logprobs=torch.log(_t(1.5, 0.5, 1.1, 0.7)).view(2, 2),  # ratios against old_logprobs = 0
    old_logprobs=torch.zeros(2, 2),
    advantages=_t(1.0, 1.0, -1.0, -1.0).view(2, 2),
    values=_t(0.5, -0.1, 0.3, 0.0).view(2, 2),
    old_values=torch.zeros(2, 2),
    returns=_t(1.0, 0.0, -1.0, 0.5).view(2, 2),
)


def test_ppo_loss_hand_computed_with_gradients():
    inputs = {k: v.clone().requires_grad_(k in ("logprobs", "values")) for k, v in PPO_INPUTS.items()}
    loss, stats = ppo_loss(**inputs, clip_range=0.2, clip_range_value=0.2, vf_coef=0.1)
    # policy: max(-A r, -A clip(r)) = max(-1.5, -1.2), max(-0.5, -0.8), max(1.1, 1.1), max(0.7, 0.8)
    torch.testing.assert_close(stats["policy_loss"], torch.tensor((-1.2 - 0.5 + 1.1 + 0.8) / 4), **TOL)
    # value: clipped predictions 0.2, -0.1, 0.2, 0.0; max squared errors 0.64, 0.01, 1.69, 0.25
    torch.testing.assert_close(stats["value_loss"], torch.tensor(0.5 * 2.59 / 4), **TOL)
    torch.testing.assert_close(loss, torch.tensor(0.05 + 0.1 * 0.32375), **TOL)
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(0.75), **TOL)
    loss.backward()
    # the clipped terms (r=1.5 with A>0, r=0.7 with A<0) pass no gradient; the others pass -A r / 4
    torch.testing.assert_close(inputs["logprobs"].grad, _t(0.0, -0.125, 0.275, 0.0).view(2, 2), **TOL)
    # values: 0.1 * 0.5 * 2 (v - R) / 4 where the unclipped error wins, 0 where the clipped one does
    torch.testing.assert_close(inputs["values"].grad, _t(0.0, -0.0025, 0.0325, -0.0125).view(2, 2), **TOL)
    perturbed = {**PPO_INPUTS, "advantages": PPO_INPUTS["advantages"] * 2}
    assert not torch.allclose(ppo_loss(**perturbed)[0], loss)  # negative control


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimates_match_the_exact_kl(estimator):
    """Averaged over tokens sampled from pi, both estimators give KL(pi || ref) of torch.distributions."""
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(6, generator=g), torch.randn(6, generator=g)
    p, ref = torch.distributions.Categorical(logits=logits), torch.distributions.Categorical(logits=ref_logits)
    exact = torch.distributions.kl_divergence(p, ref)
    torch.testing.assert_close(exact_kl(logits, ref_logits), exact, **TOL)
    tokens = torch.multinomial(p.probs, 200_000, replacement=True, generator=g)
    estimate = kl_penalty(p.log_prob(tokens), ref.log_prob(tokens), estimator).mean()
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0.0)  # Monte Carlo error ~ 0.003 at 200k samples
    assert not torch.allclose(estimate, exact_kl(logits, ref_logits.flip(0)), atol=0.02)  # negative control
    if estimator == "k3":
        assert (kl_penalty(p.log_prob(tokens), ref.log_prob(tokens), "k3") >= 0).all()


def test_reward_model_head_reads_the_gpt_trunk():
    """With the head set to token k's unembedding row, the reward model's per-token output is GPT's logit k."""
    gpt = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16)).eval()
    rm = RewardModel.from_gpt(gpt).eval()
    with torch.no_grad():
        rm.head.weight.copy_(gpt.lm_head.weight[3:4])
    idx = torch.randint(11, (2, 9))
    torch.testing.assert_close(rm.per_token(idx), gpt(idx)[0][..., 3], **TOL)
    torch.testing.assert_close(rm(idx, prompt_len=4), gpt(idx)[0][:, -1, 3], **TOL)  # pool="last"
    with torch.no_grad():
        rm.gpt.transformer.h[0].mlp.c_fc.weight[0, 0] += 0.5  # a uniform shift would cancel: LN output has mean 0
    assert not torch.allclose(rm.per_token(idx), gpt(idx)[0][..., 3], **TOL)  # negative control


def test_completion_logprobs_are_minus_cross_entropy():
    gpt = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.randint(11, (3, 10))
    logits = gpt(idx)[0][:, 3:-1]  # positions predicting tokens 4..9
    expected = -F.cross_entropy(logits.transpose(1, 2), idx[:, 4:], reduction="none")  # (3, 6)
    torch.testing.assert_close(completion_logprobs(gpt, idx, prompt_len=4), expected, **TOL)
    assert not torch.allclose(completion_logprobs(gpt, idx, prompt_len=5), expected[:, 1:] + 0.1)


@pytest.mark.parametrize("beta", [0.0, -0.1, True])
def test_dpo_rejects_non_positive_beta(beta):
    with pytest.raises(ValueError, match=rf"beta must be a positive number, got {beta!r}"):
        dpo_loss(**DPO_INPUTS, beta=beta)


def test_mismatched_batch_sizes_are_named():
    with pytest.raises(
        ValueError, match=r"ref_rejected_logps must have the shape of policy_chosen_logps \(2,\), got \(3,\)"
    ):
        dpo_loss(**{**DPO_INPUTS, "ref_rejected_logps": _t(0.0, 0.0, 0.0)})
    with pytest.raises(ValueError, match=r"rejected_rewards must have the shape of chosen_rewards \(2,\), got \(1,\)"):
        bradley_terry_loss(_t(1.0, 2.0), _t(1.0))
    with pytest.raises(ValueError, match=r"returns must have the shape of logprobs \(2, 2\), got \(2, 3\)"):
        ppo_loss(**{**PPO_INPUTS, "returns": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"values must have the shape of rewards \(1, 3\), got \(1, 2\)"):
        gae(torch.zeros(1, 3), torch.zeros(1, 2))


def test_other_bad_inputs():
    with pytest.raises(TypeError, match="chosen_rewards must be a floating-point tensor, got torch.int64"):
        bradley_terry_loss(torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\], got 1.5"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), lam=1.5)
    with pytest.raises(ValueError, match=r"clip_range must be a positive number, got 0"):
        ppo_loss(**PPO_INPUTS, clip_range=0)
    with pytest.raises(ValueError, match=r"estimator must be one of \('k1', 'k3'\), got 'k2'"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k2")
    with pytest.raises(ValueError, match="pool must be one of"):
        RewardModel(GPTConfig(block_size=8, vocab_size=5, n_layer=1, n_head=1, n_embd=8), pool="max")
    with pytest.raises(ValueError, match=r"prompt_len must be an int in \[1, 9\)"):
        completion_logprobs(GPT(GPTConfig(block_size=16, vocab_size=5, n_layer=1, n_head=1, n_embd=8)),
                            torch.zeros(1, 9, dtype=torch.long), 9)  # fmt: skip

"""RLHF end to end on a tiny GPT pretrained on tiny-shakespeare: the reward model learns the rule from pairs of
the policy's own samples, and short PPO and DPO runs raise the held-out rule score of samples over the
pretrained policy while staying near it. Seeded, CPU; the pretrained policy is built once for the module.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from impl.gpt import load_shakespeare
from impl.rlhf import RewardModel
from impl.rlhf.__main__ import main as rlhf_main
from impl.rlhf.dpo import DPOConfig, DPOTrainer
from impl.rlhf.models import sample_completions
from impl.rlhf.ppo import PPOConfig, PPOTrainer, pair_accuracy, train_reward_model
from impl.rlhf.task import PolicyConfig, preference_pairs, pretrain_policy, sample_prompts, score_sequences

PROMPT_LEN, COMPLETION_LEN = 8, 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and two threads on a busy 2-core machine run 15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(one_thread, shakespeare_path):
    """Pretrained policy, its tokenizer, preference pairs (train / held-out) and held-out prompts."""
    if shakespeare_path is None:
        pytest.skip("no tiny-shakespeare file (set TINYSHAKESPEARE)")
    policy, tokenizer, val = pretrain_policy(load_shakespeare(shakespeare_path), PolicyConfig(steps=150, seed=0))
    g = torch.Generator().manual_seed(1)
    chosen, rejected = preference_pairs(
        policy, sample_prompts(val, 256, PROMPT_LEN, g), COMPLETION_LEN, tokenizer, generator=g
    )
    n = len(chosen) * 3 // 4
    return SimpleNamespace(
        policy=policy, tokenizer=tokenizer, val=val, pairs=(chosen[:n], rejected[:n]),
        held_pairs=(chosen[n:], rejected[n:]), held_prompts=sample_prompts(val, 64, PROMPT_LEN, g),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reward_model(world):
    rm = RewardModel.from_gpt(world.policy, pool="mean")
    train_reward_model(rm, *world.pairs, PROMPT_LEN, steps=60, generator=torch.Generator().manual_seed(2))
    return rm


def held_out_rule_score(model, world) -> float:
    samples = sample_completions(model, world.held_prompts, COMPLETION_LEN, torch.Generator().manual_seed(5))
    return score_sequences(samples, PROMPT_LEN, world.tokenizer).mean().item()


def test_pairs_are_ranked_by_the_rule(world):
    chosen, rejected = world.pairs
    assert len(chosen) > 100  # of 256 prompts, few have two completions with the same vowel count
    tok = world.tokenizer
    assert (score_sequences(chosen, PROMPT_LEN, tok) > score_sequences(rejected, PROMPT_LEN, tok)).all()
    assert (chosen[:, :PROMPT_LEN] == rejected[:, :PROMPT_LEN]).all()  # one prompt, two completions


def test_reward_model_learns_the_rule(world, reward_model):
    """Held-out pairs: the untrained head scores every completion 0 (no pair right), the trained one most."""
    untrained = RewardModel.from_gpt(world.policy, pool="mean")
    assert pair_accuracy(untrained, *world.held_pairs, PROMPT_LEN) == 0.0  # negative control: all ties
    assert pair_accuracy(reward_model, *world.held_pairs, PROMPT_LEN) > 0.65  # 0.72 to 0.86 in trial runs


def test_ppo_raises_rule_score_with_bounded_kl(world, reward_model):
    torch.manual_seed(3)
    before = held_out_rule_score(world.policy, world)
    policy = copy.deepcopy(world.policy)
    ppo = PPOTrainer(policy, reward_model, PPOConfig(completion_len=COMPLETION_LEN, kl_coef=0.2))
    g = torch.Generator().manual_seed(3)
    history = [ppo.step(sample_prompts(world.val, 32, PROMPT_LEN, g), g) for _ in range(10)]
    after = held_out_rule_score(policy, world)
    assert after > before + 0.05  # 0.25 -> 0.37 in trial runs
    assert history[-1]["reward"] > history[0]["reward"] + 1.0  # the reward model's score rises
    assert max(h["kl"] for h in history) < 10.0  # nats over 16 tokens; 4 in trial runs
    unpenalized = PPOTrainer(copy.deepcopy(world.policy), reward_model, PPOConfig(COMPLETION_LEN, kl_coef=0.0))
    g = torch.Generator().manual_seed(3)
    free = [unpenalized.step(sample_prompts(world.val, 32, PROMPT_LEN, g), g) for _ in range(10)]
    assert free[-1]["kl"] > 1.5 * history[-1]["kl"]  # control: no penalty drifts ~3x further (3 seeds)
    assert held_out_rule_score(world.policy, world) == before  # the pretrained policy itself is untouched


@pytest.mark.parametrize("ipo", [False, True], ids=["dpo", "ipo"])
def test_dpo_raises_margin_and_rule_score(world, ipo):
    before = held_out_rule_score(world.policy, world)
    policy = copy.deepcopy(world.policy)
    dpo = DPOTrainer(policy, DPOConfig(beta=0.1, ipo=ipo))
    start = dpo.evaluate(*world.held_pairs, PROMPT_LEN)
    assert start["margin"] == 0.0  # the policy is its reference
    g = torch.Generator().manual_seed(4)
    chosen, rejected = world.pairs
    for _ in range(30):
        rows = torch.randint(len(chosen), (32,), generator=g)
        dpo.step(chosen[rows], rejected[rows], PROMPT_LEN)
    end = dpo.evaluate(*world.held_pairs, PROMPT_LEN)
    assert end["margin"] > 0.2 and end["accuracy"] > 0.7  # DPO 0.79, 0.82; IPO 0.28, 0.86 in trial runs
    assert held_out_rule_score(policy, world) > before + 0.1  # 0.25 -> 0.52 in trial runs


def test_identical_and_mismatched_pairs_are_refused(world):
    chosen, rejected = world.pairs[0][:4], world.pairs[1][:4]
    dpo = DPOTrainer(copy.deepcopy(world.policy))
    same = rejected.clone()
    same[2] = chosen[2]
    with pytest.raises(
        ValueError, match=r"chosen and rejected must differ in every pair, got identical pairs at rows \[2\]"
    ):
        dpo.step(chosen, same, PROMPT_LEN)
    with pytest.raises(ValueError, match=r"rejected must have the shape of chosen \(4, 24\).*got \(3, 24\)"):
        dpo.step(chosen, rejected[:3], PROMPT_LEN)
    with pytest.raises(ValueError, match="chosen and rejected must differ"):
        train_reward_model(RewardModel.from_gpt(world.policy), chosen, same, PROMPT_LEN, steps=1)
    with pytest.raises(ValueError, match=r"DPOConfig.beta must be a positive number, got 0"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match=r"PPOConfig.kl_coef must be a number >= 0, got -0.1"):
        PPOConfig(kl_coef=-0.1)


def test_cli_prints_before_and_after(shakespeare_path, capsys):
    if shakespeare_path is None:
        pytest.skip("no tiny-shakespeare file (set TINYSHAKESPEARE)")
    assert rlhf_main(["--steps", "2", "--pretrain-steps", "20", "--shakespeare", shakespeare_path]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: rule score" in out for name in ("pretrained", "ppo", "dpo"))
    with pytest.raises(SystemExit):
        rlhf_main(["--steps", "0"])
    assert "argument --steps: must be an int >= 1, got '0'" in capsys.readouterr().err

"""RLHF: what PPO holds and costs against DPO, and how each moves the policy, on a tiny Shakespeare GPT.

The policy is a small character GPT briefly pretrained on tiny-shakespeare (`impl.rlhf.task.pretrain_policy`).
Preference pairs are two of its own samples per prompt ranked by the vowel rule; a reward model (GPT trunk +
scalar head) learns them with the Bradley-Terry loss. Then:

- rlhf-step: one PPO step (rollout of 32 prompts x 16 tokens, then 4 epochs of minibatch updates) against one
  DPO step (32 pairs). Memory: `weight_bytes` are the weights of the models each method holds (PPO: policy,
  reference, reward, value; DPO: policy, reference), `weights_and_adam_bytes` adds AdamW's two moments of the
  trained ones (PPO: policy and value; DPO: policy); `peak_bytes` is what one step allocates (the first, so
  AdamW's state is in it); PPO's is smaller because it updates in minibatches of 16 sequences, DPO runs 64.
- rlhf-curve: the policy after `step` PPO rounds or DPO steps, on held-out prompts: the rule score of its samples
  (the task's truth, never shown to either method), the frozen reward model's score, and the KL to the
  reference (summed over the 16 completion tokens, k1 estimate on the samples). A PPO step is one rollout and
  its 8 minibatch updates; a DPO step is one update on 32 pairs. The timed call samples and
  scores those completions; `completion` is one example, newlines shown as '/'.
"""

import copy

import pytest
import torch

from impl.common import tensor_bytes
from impl.gpt import load_shakespeare
from impl.rlhf import RewardModel
from impl.rlhf.dpo import DPOConfig, DPOTrainer
from impl.rlhf.losses import kl_penalty
from impl.rlhf.models import completion_logprobs, sample_completions
from impl.rlhf.ppo import PPOConfig, PPOTrainer, pair_accuracy, train_reward_model
from impl.rlhf.task import PolicyConfig, preference_pairs, pretrain_policy, sample_prompts, score_sequences

SWEEPS = {"step": {"smoke": [0, 3], "small": [0, 5, 10, 15, 20, 30], "full": [0, 5, 10, 15, 20, 30, 40, 60]}}
PRETRAIN_STEPS = {"smoke": 100, "small": 300, "full": 500}
PROMPT_LEN, COMPLETION_LEN, BATCH = 8, 16, 32
METHODS = ("ppo", "dpo")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: the models are tiny, and two threads on a busy 2-core machine run
    15x slower. Every row of this file is therefore a single-thread figure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(one_thread, shakespeare_path, size, device):
    """Pretrained policy, pairs, reward model, and the policy's state after each swept step of PPO and DPO."""
    if device.type != "cpu":
        pytest.skip("the RLHF models are tiny and run on CPU; their sampling generators are CPU generators")
    if shakespeare_path is None:
        pytest.skip("no tiny-shakespeare file (set TINYSHAKESPEARE)")
    config = PolicyConfig(steps=PRETRAIN_STEPS[size], seed=0)
    policy, tokenizer, val = pretrain_policy(load_shakespeare(shakespeare_path), config)
    g = torch.Generator().manual_seed(1)
    chosen, rejected = preference_pairs(
        policy, sample_prompts(val, 256, PROMPT_LEN, g), COMPLETION_LEN, tokenizer, generator=g
    )
    n = len(chosen) * 3 // 4
    reward_model = RewardModel.from_gpt(policy, pool="mean")
    train_reward_model(reward_model, chosen[:n], rejected[:n], PROMPT_LEN, steps=60, generator=g)
    snapshots = {
        m: _train(m, policy, reward_model, chosen[:n], rejected[:n], val, SWEEPS["step"][size]) for m in METHODS
    }
    return dict(
        policy=policy, tokenizer=tokenizer, val=val, pairs=(chosen[:n], rejected[:n]), reward_model=reward_model,
        rm_accuracy=pair_accuracy(reward_model, chosen[n:], rejected[n:], PROMPT_LEN), snapshots=snapshots,
        held_prompts=sample_prompts(val, 64, PROMPT_LEN, torch.Generator().manual_seed(5)),
    )  # fmt: skip


def _train(method, policy, reward_model, chosen, rejected, val, steps) -> dict[int, dict]:
    """Policy state dicts after each step in `steps` of `method`, seeded."""
    policy = copy.deepcopy(policy)
    trainer = _trainer(method, policy, reward_model)
    g = torch.Generator().manual_seed(3)
    snapshots = {}
    for step in range(max(steps) + 1):
        if step in steps:
            snapshots[step] = copy.deepcopy(policy.state_dict())
        if step < max(steps):
            _step(method, trainer, chosen, rejected, val, g)
    return snapshots


def _trainer(method, policy, reward_model):
    if method == "ppo":
        return PPOTrainer(policy, reward_model, PPOConfig(completion_len=COMPLETION_LEN, kl_coef=0.2))
    return DPOTrainer(policy, DPOConfig(beta=0.1))


def _step(method, trainer, chosen, rejected, val, g):
    if method == "ppo":
        return trainer.step(sample_prompts(val, BATCH, PROMPT_LEN, g), g)
    rows = torch.randint(len(chosen), (BATCH,), generator=g)
    return trainer.step(chosen[rows], rejected[rows], PROMPT_LEN)


def _weight_bytes(*models) -> int:
    unique = {id(p): p for m in models for p in m.parameters()}  # tied embeddings counted once
    return tensor_bytes(*unique.values())


@pytest.mark.benchmark(group="rlhf-step")
@pytest.mark.parametrize("method", METHODS)
def test_step(bench, world, method):
    policy = copy.deepcopy(world["policy"])
    trainer = _trainer(method, policy, world["reward_model"])
    held = [trainer.policy, trainer.reference]
    if method == "ppo":
        held += [trainer.reward_model, trainer.value_model]
    trainable = _weight_bytes(*(m for m in held if any(p.requires_grad for p in m.parameters())))
    g = torch.Generator().manual_seed(3)
    bench(
        lambda: _step(method, trainer, *world["pairs"], world["val"], g),
        variant=method,
        params=dict(threads=1, batch=BATCH, prompt_len=PROMPT_LEN, completion_len=COMPLETION_LEN),
        dtype=torch.float32,
        baseline=method == "dpo",
        items=BATCH,
        items_unit="sequences/s",
        metrics=dict(
            models=len(held),
            weight_bytes=_weight_bytes(*held),
            trainable_bytes=trainable,
            weights_and_adam_bytes=_weight_bytes(*held) + 2 * trainable,  # AdamW: two moments per trained weight
            reward_model_pair_accuracy=world["rm_accuracy"],
        ),
    )


@pytest.mark.benchmark(group="rlhf-curve")
@pytest.mark.parametrize("method", METHODS)
def test_curve(bench, world, method, step):
    policy = copy.deepcopy(world["policy"])
    policy.load_state_dict(world["snapshots"][method][step])
    prompts, reward_model = world["held_prompts"], world["reward_model"]

    def evaluate():
        samples = sample_completions(policy, prompts, COMPLETION_LEN, torch.Generator().manual_seed(7))
        with torch.no_grad():
            logprobs = completion_logprobs(policy, samples, PROMPT_LEN)
            ref_logprobs = completion_logprobs(world["policy"], samples, PROMPT_LEN)
            return dict(
                rule_score=score_sequences(samples, PROMPT_LEN, world["tokenizer"]).mean().item(),
                reward=reward_model(samples, PROMPT_LEN).mean().item(),
                kl=kl_penalty(logprobs, ref_logprobs).sum(1).mean().item(),
                completion=world["tokenizer"].decode(samples[0, PROMPT_LEN:]).replace("\n", "/"),
            )

    bench(
        evaluate,
        variant=method,
        params=dict(threads=1, step=step),
        sweep="step",
        dtype=torch.float32,
        items=len(prompts),
        items_unit="samples/s",
        metrics=evaluate(),
        plot=("rule_score", "reward", "kl"),
    )

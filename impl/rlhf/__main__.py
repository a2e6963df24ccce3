"""python -m impl.rlhf: RLHF end to end on a tiny Shakespeare GPT, PPO and DPO side by side.

Pretrains a small character GPT, ranks pairs of its own samples by the vowel rule, trains a Bradley-Terry
reward model on them, then runs PPO (against the reward model) and DPO (on the pairs) from the same policy and
prints the held-out rule score, the KL to the reference and a sample before and after.

    python -m impl.rlhf --steps 30 --shakespeare /path/to/tinyshakespeare.txt
"""

import copy
import sys

import torch
from tqdm import tqdm

from impl.common import cli, seed_everything
from impl.gpt import load_shakespeare
from impl.rlhf.dpo import DPOConfig, DPOTrainer
from impl.rlhf.losses import kl_penalty
from impl.rlhf.models import RewardModel, completion_logprobs, sample_completions
from impl.rlhf.ppo import PPOConfig, PPOTrainer, pair_accuracy, train_reward_model
from impl.rlhf.task import PolicyConfig, preference_pairs, pretrain_policy, sample_prompts, score_sequences

PROMPT_LEN, COMPLETION_LEN, BATCH = 8, 16, 32


def _evaluate(policy, reference, prompts, tokenizer) -> dict:
    samples = sample_completions(policy, prompts, COMPLETION_LEN, torch.Generator().manual_seed(7))
    with torch.no_grad():
        kl = kl_penalty(
            completion_logprobs(policy, samples, PROMPT_LEN), completion_logprobs(reference, samples, PROMPT_LEN)
        )
    return {
        "rule_score": score_sequences(samples, PROMPT_LEN, tokenizer).mean().item(),
        "kl": kl.sum(1).mean().item(),
        "sample": tokenizer.decode(samples[0]),
    }


def run(text: str, steps: int, pretrain_steps: int, seed: int, progress: bool = True) -> dict[str, dict]:
    """Held-out rule score, KL and a sample of the pretrained policy, and after `steps` of PPO and of DPO."""
    seed_everything(seed)
    policy, tok, val = pretrain_policy(text, PolicyConfig(steps=pretrain_steps, seed=seed), progress=progress)
    g = torch.Generator().manual_seed(seed + 1)
    chosen, rejected = preference_pairs(
        policy, sample_prompts(val, 256, PROMPT_LEN, g), COMPLETION_LEN, tok, generator=g
    )
    n = len(chosen) * 3 // 4
    reward_model = RewardModel.from_gpt(policy, pool="mean")
    train_reward_model(reward_model, chosen[:n], rejected[:n], PROMPT_LEN, steps=60, generator=g)
    held = sample_prompts(val, 64, PROMPT_LEN, g)
    results = {"pretrained": _evaluate(policy, policy, held, tok)}
    results["pretrained"]["reward_model_accuracy"] = pair_accuracy(reward_model, chosen[n:], rejected[n:], PROMPT_LEN)
    ppo = PPOTrainer(copy.deepcopy(policy), reward_model, PPOConfig(completion_len=COMPLETION_LEN, kl_coef=0.2))
    dpo = DPOTrainer(copy.deepcopy(policy), DPOConfig(beta=0.1))
    for _ in tqdm(range(steps), desc="ppo", disable=not progress):
        ppo.step(sample_prompts(val, BATCH, PROMPT_LEN, g), g)
    for _ in tqdm(range(steps), desc="dpo", disable=not progress):
        rows = torch.randint(n, (BATCH,), generator=g)
        dpo.step(chosen[rows], rejected[rows], PROMPT_LEN)
    results["ppo"] = _evaluate(ppo.policy, policy, held, tok)
    results["dpo"] = {**_evaluate(dpo.policy, policy, held, tok), **dpo.evaluate(chosen[n:], rejected[n:], PROMPT_LEN)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("impl.rlhf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=cli.positive_int, default=30, help="PPO rounds and DPO steps")
    parser.add_argument("--pretrain-steps", type=cli.positive_int, default=300, help="pretraining steps of the policy")
    parser.add_argument("--shakespeare", type=cli.existing_file, default=None,
                        help="tiny-shakespeare file (else $TINYSHAKESPEARE)")  # fmt: skip
    parser.add_argument("--seed", type=cli.non_negative_int, default=0)
    args = parser.parse_args(argv)
    try:  # the corpus is found (or downloaded) before any work, and its absence is the user's to fix
        text = load_shakespeare(args.shakespeare)
    except RuntimeError as err:
        raise FileNotFoundError(str(err)) from err
    results = run(text, args.steps, args.pretrain_steps, args.seed)
    for name, r in results.items():
        extra = {k: round(v, 3) for k, v in r.items() if k not in ("rule_score", "kl", "sample")}
        print(f"{name:>10}: rule score {r['rule_score']:.3f}, KL {r['kl']:.2f} nats {extra or ''}")
        print(f"{'':>10}  {r['sample']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A memory planner validated by measurement: per-device bytes by term for a model shape and a technique mix
(dtype, LoRA/QLoRA, optimizer, ZeRO, TP, PP, checkpointing, KV cache), composed from the formulas that live next
to each technique; `impl.plan.validate` runs small configurations for one real step and measures every term."""

from impl.plan.configs import unvalidated
from impl.plan.setup import Setup
from impl.plan.shapes import KNOWN_MODELS, ModelShape, model_shape
from impl.plan.terms import MODEL_STATES, TERMS, Plan, levers, plan

__all__ = ["KNOWN_MODELS", "MODEL_STATES", "TERMS", "ModelShape", "Plan", "Setup", "levers", "model_shape", "plan",
           "unvalidated"]

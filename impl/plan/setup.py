"""The technique mix a plan is made for: every knob of the planner, with a default, checked once."""

from dataclasses import dataclass

from impl.common.checks import check_bool, check_int, check_one_of, show

MODES = ("train", "inference")
DTYPES = ("float32", "bfloat16", "float16")
FINETUNES = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adamw-8bit")
SCHEDULES = ("gpipe", "1f1b")
CHECKPOINTING = ("none", "every", "every-k", "sqrt")


@dataclass(frozen=True)
class Setup:
    mode: str = "train"  # "train" (one optimizer step) or "inference" (decoding with a KV cache)
    dtype: str = "float32"  # compute dtype of weights and activations
    mixed_precision: bool = False  # bf16/fp16 compute with fp32 master weights and optimizer state (ZeRO's setting)
    finetune: str = "full"  # "full", "lora" (frozen base) or "qlora" (frozen NF4 base)
    lora_rank: int = 8  # r of every adapter
    lora_targets: tuple[str, ...] = ()  # linear names (suffixes, as peft matches); () = the attention projections
    nf4_block_size: int = 64  # QLoRA: values per NF4 constant
    double_quant: bool = True  # QLoRA: quantize the NF4 constants to 8 bits (the paper's default)
    optimizer: str = "adamw"  # "adamw", "sgd", "sgd-momentum", "adamw-8bit" (bitsandbytes; formula only)
    zero_stage: int = 0  # ZeRO stage 0-3 over the data-parallel ranks
    world_size: int = 1  # ranks in all: data x tensor x pipeline parallel
    tp: int = 1  # tensor-parallel degree (Megatron-LM)
    pp: int = 1  # pipeline stages
    micro_batches: int = 1  # micro-batches per step through the pipeline
    schedule: str = "1f1b"  # pipeline schedule: "gpipe" or "1f1b"
    checkpointing: str = "none"  # activation checkpointing policy
    checkpoint_every: int = 2  # blocks per segment with "every-k"
    seq_len: int = 512  # tokens per sequence in training
    micro_batch: int = 1  # sequences per micro-batch
    packing: bool = False  # several documents per row: SDPA keeps a (B, T, T) document mask per block
    dropout: bool = False  # dropout on (its masks are kept for backward)
    kv_len: int = 2048  # inference: cache slots per sequence (prompt + generated)
    kv_batch: int = 1  # inference: sequences decoded together
    kv_int8: bool = False  # inference: int8 KV cache with one scale per head vector

    def __post_init__(self) -> None:
        check_one_of("mode", self.mode, MODES)
        check_one_of("dtype", self.dtype, DTYPES)
        check_one_of("finetune", self.finetune, FINETUNES)
        check_one_of("optimizer", self.optimizer, OPTIMIZERS)
        check_one_of("schedule", self.schedule, SCHEDULES)
        check_one_of("checkpointing", self.checkpointing, CHECKPOINTING)
        check_one_of("zero_stage", check_int("zero_stage", self.zero_stage), (0, 1, 2, 3))
        for name in ("mixed_precision", "double_quant", "packing", "dropout", "kv_int8"):
            check_bool(name, getattr(self, name))
        for name in ("lora_rank", "world_size", "tp", "pp", "micro_batches", "checkpoint_every", "seq_len",
                     "micro_batch", "kv_len", "kv_batch"):  # fmt: skip
            check_int(name, getattr(self, name), low=1)
        check_int("nf4_block_size", self.nf4_block_size, low=2)
        if self.nf4_block_size % 2:
            raise ValueError(f"nf4_block_size must be an even int >= 2, got {self.nf4_block_size}")
        if not isinstance(self.lora_targets, tuple) or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets must be a tuple of linear names, got {show(self.lora_targets)}")
        if self.mixed_precision and self.dtype == "float32":
            raise ValueError("mixed_precision must be False with dtype 'float32' (it means 16-bit compute), got True")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(f"world_size must be a multiple of tp * pp = {self.tp * self.pp}, got {self.world_size}")
        if self.mode == "inference" and self.pp > 1:
            raise ValueError(f"pp must be 1 in inference (the planner decodes on tensor-parallel ranks), got {self.pp}")

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the ZeRO divisor."""
        return self.world_size // (self.tp * self.pp)

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def trainable_bytes(self) -> int:
        """Bytes of a trainable parameter (and of its gradient) on a device."""
        if self.finetune != "full" and not self.mixed_precision:
            return 4  # LoRA's adapters are fp32 (impl.finetune), whatever the base's dtype
        return 2 if self.mixed_precision else self.itemsize

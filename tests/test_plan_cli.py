"""`python -m impl plan`: the CLI prints what `impl.plan.plan` computes (the library is the live reference), the
estimators beside it match DeepSpeed's documented tables and accelerate's own functions on the same model, memory
strings parse by their units, `--sweep` writes its plot, and every bad input is one `error:` line with exit 2."""

import json
import os
import subprocess
import sys
from dataclasses import fields, replace

import pytest

from impl.__main__ import main as impl_main
from impl.plan import KNOWN_MODELS, TERMS, Setup, levers, model_shape, plan
from impl.plan.__main__ import build_parser, human, setup_from_args
from impl.plan.devices import DEVICES, MEMORY, device, parse_memory
from impl.plan.estimators import deepspeed_zero2, deepspeed_zero3, weights_only
from impl.plan.questions import QUESTIONS, answer, largest_fitting, param_counts

GIB = 2**30
QLORA_7B = ["llama-2-7b", "--dtype", "bfloat16", "--finetune", "qlora", "--lora-rank", "64", "--checkpointing",
            "every", "--seq-len", "1024"]  # fmt: skip
QLORA_7B_SETUP = Setup(dtype="bfloat16", finetune="qlora", lora_rank=64, checkpointing="every", seq_len=1024)


def _run(argv, capsys) -> tuple[int, str, str]:
    code = impl_main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- the CLI shows the library's numbers ----------------------------------------------------------------------


def test_the_table_is_the_library_plan(capsys):
    code, out, err = _run([*QLORA_7B, "--device-memory", "24GiB"], capsys)
    assert code == 0, err
    reference = plan(model_shape("llama-2-7b"), QLORA_7B_SETUP)
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.startswith("  ")}
    for term in TERMS:
        assert " ".join(rows[term]) == human(reference.terms[term]), term
    assert f"({reference.total:,} bytes)" in out
    assert f"fits on 24GiB (24 GiB): {human(24 * GIB - reference.total)} to spare" in out


def test_json_is_the_library_plan_exactly_and_a_flag_changes_it(capsys):
    code, out, _ = _run([*QLORA_7B, "--device", "RTX-4090", "--json"], capsys)
    got = json.loads(out)
    shape = model_shape("llama-2-7b")
    reference = plan(shape, QLORA_7B_SETUP)
    assert code == 0 and got["terms"] == reference.terms and got["total"] == reference.total
    assert got["fits"] is True and got["margin"] == 24 * GIB - reference.total and got["device"] == "RTX-4090-24GB"
    assert got["levers"] == [{"what": w, "saved": s} for w, s in levers(shape, QLORA_7B_SETUP, 24 * GIB)]
    # Negative control: a different rank is a different plan, so the equality above can fail.
    _, out8, _ = _run([*QLORA_7B[:6], "8", *QLORA_7B[7:], "--device", "RTX-4090", "--json"], capsys)
    assert json.loads(out8)["terms"]["lora_weights"] < got["terms"]["lora_weights"]


def test_a_plan_that_does_not_fit_says_by_how_much_and_names_the_levers(capsys):
    code, out, _ = _run(["llama-2-13b", "--device", "A100-40GB"], capsys)
    reference = plan(model_shape("llama-2-13b"), Setup())
    assert code == 0 and not reference.fits(40 * GIB)
    assert f"does not fit on A100-40GB (40 GiB): {human(reference.total - 40 * GIB)} over" in out
    best = levers(model_shape("llama-2-13b"), Setup(), 40 * GIB)
    assert best and f"largest levers: {best[0][0]} saves {human(best[0][1])}" in out


def test_every_setup_field_has_an_option():
    options = {o for action in build_parser()._actions for o in action.option_strings}
    for f in fields(Setup):
        flag = "--inference" if f.name == "mode" else "--" + f.name.replace("_", "-")
        assert flag in options, f.name


@pytest.mark.parametrize(("argv", "expected"), [
    (["--inference", "--kv-len", "4096", "--kv-batch", "3", "--kv-int8"],
     dict(mode="inference", kv_len=4096, kv_batch=3, kv_int8=True)),
    (["--dtype", "float16", "--mixed-precision", "--optimizer", "sgd-momentum"],
     dict(dtype="float16", mixed_precision=True, optimizer="sgd-momentum")),
    (["--finetune", "qlora", "--lora-rank", "4", "--lora-targets", "q_proj,o_proj", "--nf4-block-size", "32",
      "--no-double-quant"],
     dict(finetune="qlora", lora_rank=4, lora_targets=("q_proj", "o_proj"), nf4_block_size=32, double_quant=False)),
    (["--zero-stage", "2", "--world-size", "8", "--tp", "2", "--pp", "2", "--micro-batches", "4", "--schedule",
      "gpipe"], dict(zero_stage=2, world_size=8, tp=2, pp=2, micro_batches=4, schedule="gpipe")),
    (["--checkpointing", "every-k", "--checkpoint-every", "3", "--seq-len", "77", "--micro-batch", "5", "--packing",
      "--dropout"],
     dict(checkpointing="every-k", checkpoint_every=3, seq_len=77, micro_batch=5, packing=True, dropout=True)),
    ([], {}),
], ids=["inference", "precision", "qlora", "parallel", "activations", "defaults"])  # fmt: skip
def test_each_option_sets_its_setup_field(argv, expected):
    args = build_parser().parse_args(["gpt2", "--device-memory", "1GiB", *argv])
    assert setup_from_args(args) == Setup(**expected)


def test_a_config_json_is_the_same_model_as_its_name(tmp_path, capsys):
    s = KNOWN_MODELS["llama-2-7b"]
    config = {"model_type": "llama", "vocab_size": s.vocab_size, "hidden_size": s.hidden_size,
              "num_hidden_layers": s.num_layers, "num_attention_heads": s.num_heads,
              "num_key_value_heads": s.num_kv_heads, "intermediate_size": s.intermediate_size,
              "max_position_embeddings": s.max_positions}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, by_name, _ = _run(["llama-2-7b", "--device", "H100", "--json"], capsys)
    _, by_file, _ = _run(["--config-json", str(tmp_path / "config.json"), "--device", "H100", "--json"], capsys)
    assert json.loads(by_file)["terms"] == json.loads(by_name)["terms"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 11000}))  # negative control
    _, other, _ = _run([str(tmp_path / "config.json"), "--device", "H100", "--json"], capsys)
    assert json.loads(other)["total"] != json.loads(by_name)["total"]


# --- the sweep --------------------------------------------------------------------------------------------------


def test_sweep_writes_a_png_of_the_library_totals(tmp_path, capsys):
    from PIL import Image

    code, out, err = _run(["gpt2", "--device-memory", "2GiB", "--sweep", "seq_len=128,512,1024", "--out",
                           str(tmp_path), "--json"], capsys)  # fmt: skip
    assert code == 0, err
    got = json.loads(out)["sweep"]
    totals = [plan(KNOWN_MODELS["gpt2"], Setup(seq_len=n)).total for n in (128, 512, 1024)]
    assert got["totals"] == totals and totals == sorted(totals) and len(set(totals)) == 3
    assert got["fits"] == [t <= 2 * GIB for t in totals]
    with Image.open(got["png"]) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_a_sweep_value_the_planner_refuses_is_an_error_and_writes_nothing(tmp_path, capsys):
    code, out, err = _run(["llama-2-7b", "--device", "H100", "--world-size", "4", "--sweep", "tp=2,3", "--out",
                           str(tmp_path / "plots")], capsys)  # fmt: skip
    assert code == 2 and out == "" and err.count("\n") == 1 and "tp=3" in err
    assert not (tmp_path / "plots").exists()


# --- bad input: one line, exit 2 --------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "needle"), [
    (["gpt-5", "--device", "H100"], "llama-2-7b"),  # the known names are listed
    (["llama-2-7b", "--tp", "3", "--world-size", "3", "--device", "H100"], "tp must divide num_heads=32"),
    (["llama-2-7b", "--zero-stage", "4", "--device", "H100"], "--zero-stage"),
    (["llama-2-7b", "--zero-stage", "-1", "--device", "H100"], "--zero-stage"),
    (["llama-2-7b", "--seq-len", "0", "--device", "H100"], "--seq-len"),
    (["llama-2-7b", "--kv-len", "-5", "--inference", "--device", "H100"], "--kv-len"),
    (["llama-2-7b", "--device-memory", "24 GiBs"], "--device-memory"),
    (["llama-2-7b", "--device-memory", "0GiB"], "--device-memory"),
    (["llama-2-7b", "--device", "A100"], "A100-80GB"),  # ambiguous: both sizes are named
    (["llama-2-7b", "--device", "H100", "--device-memory", "1GiB"], "not allowed with"),
    (["llama-2-7b"], "--device-memory"),
    (["--device", "H100"], "--config-json"),
    (["llama-2-7b", "--world-size", "2", "--tp", "4", "--device", "H100"], "--world-size must be a multiple"),
    (["llama-2-7b", "--nf4-block-size", "3", "--finetune", "qlora", "--device", "H100"], "--nf4-block-size"),
    (["llama-2-7b", "--finetune", "lora", "--lora-targets", "c_attn", "--device", "H100"], "match no linear"),
    (["llama-2-7b", "--sweep", "seq_len=512", "--device", "H100"], "--sweep"),
    (["llama-2-7b", "--sweep", "colour=1,2", "--device", "H100"], "--sweep"),
    (["llama-2-7b", "--sweep", "seq_len=1,x", "--device", "H100"], "--sweep"),
    (["llama-2-7b", "--sweep", "seq_len=512,0", "--device", "H100"], "seq_len"),
    (["llama-2-7b", "--dtype", "float8", "--device", "H100"], "--dtype"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)  # fmt: skip
def test_bad_input_is_one_error_line_and_exit_2(argv, needle, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == "", (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


@pytest.mark.parametrize(("config", "needle"), [
    ({"model_type": "llama", "vocab_size": 100, "num_hidden_layers": 2}, "missing the fields"),
    ({"model_type": "bert", "hidden_size": 64}, "model_type"),
    ([1, 2], "JSON object"),
], ids=["no-hidden-size", "unknown-family", "not-an-object"])  # fmt: skip
def test_a_config_without_the_needed_fields_is_one_error_line(config, needle, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code, _, err = _run(["--config-json", str(path), "--device", "H100"], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("argv", [["nope", "--device", "H100"], ["llama-2-7b", "--tp", "5", "--device", "H100"]],
                         ids=["unknown-model", "tp"])
def test_bad_input_in_a_fresh_process(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMPL_DEBUG": ""}
    result = subprocess.run([sys.executable, "-m", "impl", "plan", *argv], capture_output=True, text=True,
                            timeout=120, env=env)  # fmt: skip
    assert result.returncode == 2 and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr


# --- memory strings and the device table ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("1.5TiB", 3 * 2**39), ("81920MiB", 80 * 2**30),
    ("512 MB", 512 * 10**6), ("1073741824", 2**30), ("24gib", 24 * 2**30), (" 2 KiB ", 2048), ("0.5KB", 500),
    ("16B", 16),
])  # fmt: skip
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_decimal_and_binary_units_differ():  # negative control: the unit is read, not ignored
    assert parse_memory("80GB") != parse_memory("80GiB") and parse_memory("1TB") < parse_memory("1TiB")


@pytest.mark.parametrize("text", ["", "GiB", "24XB", "-1GiB", "0", "0GiB", "0.5", "nan", "inf", "1e3GB", "24 GiB x",
                                  "24,5GB", "0x10"])
def test_parse_memory_refuses_junk_naming_the_option(text):
    with pytest.raises(ValueError, match="--device-memory"):
        parse_memory(text)


def test_every_device_resolves_by_its_name_and_in_lower_case():
    for d in DEVICES:
        assert device(d.name) is d and device(d.name.lower()) is d and d.source
        assert MEMORY[d.name] == d.bytes == int(d.gib * 2**30) and d.bytes > 8 * 2**30
    assert device("rtx 4090").name == "RTX-4090-24GB" and device("H100").name == "H100-80GB"
    with pytest.raises(ValueError, match="H100-80GB"):
        device("TPUv5")


@pytest.mark.gpu
def test_the_lent_gpu_has_about_what_the_table_says():
    """The table reads datasheet "GB" as GiB: the device's total is at most that and within 5% of it."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    name = torch.cuda.get_device_name(0)
    found = [d for d in DEVICES if d.name.rsplit("-", 1)[0] in name.replace(" ", "-")]
    sized = [d for d in found if d.name.rsplit("-", 1)[1] in name.replace(" ", "")]
    if len(sized or found) != 1:
        pytest.skip(f"{name!r} is not in the table, or matches several sizes: {[d.name for d in found]}")
    entry, total = (sized or found)[0], torch.cuda.get_device_properties(0).total_memory
    assert 0.95 * entry.bytes <= total <= entry.bytes, (name, total, entry)


# --- the estimators beside the planner --------------------------------------------------------------------------

# DeepSpeed's docs (docs/code-docs/source/memory.rst): the t5-3b examples, "cold" estimators, 1 node x 8 GPUs,
# printed as bytes / 2**30 with two decimals.
ZERO2_DOC = [  # (cpu_offload, per CPU, per GPU)
    (True, "127.45", "5.31"), (False, "127.45", "15.93"),
]  # fmt: skip
ZERO3_DOC = [  # (offload_param, offload_optimizer, zero_init, per CPU, per GPU)
    (True, True, True, "71.69", "0.12"), (True, True, False, "127.45", "0.12"),
    (False, True, True, "63.72", "0.78"), (False, True, False, "127.45", "0.78"),
    (False, False, True, "1.43", "6.09"), (False, False, False, "127.45", "6.09"),
]  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _deepspeed_table(total_params: float, largest: float) -> list[tuple[str, str]]:
    rows = [deepspeed_zero2(total_params, 8, 1, cpu_offload=off) for off, _, _ in ZERO2_DOC]
    rows += [deepspeed_zero3(total_params, largest, 8, 1, cpu_offload=opt, cpu_offload_params=par, zero_init=init)
             for par, opt, init, _, _ in ZERO3_DOC]  # fmt: skip
    return [(_gib(r.per_cpu), _gib(r.per_gpu)) for r in rows]


def test_deepspeed_estimators_reproduce_the_docs_tables():
    expected = [(cpu, gpu) for _, cpu, gpu in ZERO2_DOC] + [(cpu, gpu) for *_, cpu, gpu in ZERO3_DOC]
    assert _deepspeed_table(2851e6, 32e6) == expected
    # Negative control: a model 1% larger misses the two-decimal table, so the match above is not loose.
    assert _deepspeed_table(2851e6 * 1.01, 32e6) != expected


def test_deepspeed_zero3_reproduces_the_docs_t5_large_example():
    # memory.rst: 737.67M params, 32.90M largest layer, 4 GPUs -> case 1/2/3: 3291, 125, 477 MB (bytes >> 20). The
    # doc prints the counts rounded to 10k, so the figures are checked to within 1 MB.
    cases = [(False, False, 3291), (True, True, 125), (True, False, 477)]  # (offload optimizer, params, MB)
    for opt, par, mb in cases:
        gpu = deepspeed_zero3(737.67e6, 32.90e6, 4, cpu_offload=opt, cpu_offload_params=par).per_gpu
        assert abs((gpu >> 20) - mb) <= 1, (opt, par, gpu >> 20, mb)


def test_deepspeed_estimators_refuse_what_they_do_not_cover():
    with pytest.raises(ValueError, match="cpu_offload_params"):
        deepspeed_zero3(1e9, 1e6, cpu_offload_params=True)
    with pytest.raises(ValueError, match="largest_layer_params"):
        deepspeed_zero3(1e6, 2e6)
    with pytest.raises(ValueError, match="num_gpus_per_node"):
        deepspeed_zero2(1e6, 0)


def _meta_model(name: str):
    """The Hugging Face model of a known shape on the meta device: parameters with shapes, no memory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    s = KNOWN_MODELS[name]
    with torch.device("meta"):
        if s.family == "gpt":
            return GPT2LMHeadModel(GPT2Config(vocab_size=s.vocab_size, n_embd=s.hidden_size, n_layer=s.num_layers,
                                              n_head=s.num_heads, n_positions=s.max_positions))  # fmt: skip
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
            head_dim=s.head_dim, max_position_embeddings=s.max_positions, tie_word_embeddings=s.tie_embeddings))


@pytest.mark.parametrize("name", ["gpt2", "llama-2-7b", "llama-3-8b"])
def test_param_counts_and_weights_only_match_transformers_and_accelerate(name):
    """Counts as DeepSpeed's docs count them on the live model (shared tensors once; each module's own
    parameters), and accelerate's own estimate-memory functions on that model."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.commands.estimate import estimate_training_usage

    model = _meta_model(name)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert param_counts(KNOWN_MODELS[name]) == (total, largest)
    size, _ = accelerate.utils.calculate_maximum_sizes(model)  # it also counts the buffers (RoPE's inv_freq)
    assert size == 4 * total + sum(b.numel() * b.element_size() for b in model.buffers())
    for dtype in ("float32", "bfloat16"):
        ours = weights_only(total, dtype)
        assert ours["training_adam"] == max(estimate_training_usage(4 * total, dtype).values())
        assert ours["total"] == 4 * total // (1 if dtype == "float32" else 2)
    # Negative control: an MLP one unit wider is a different count.
    wider = replace(KNOWN_MODELS[name], intermediate_size=KNOWN_MODELS[name].intermediate_size + 1)
    assert param_counts(wider)[0] != total


# --- the famous questions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", QUESTIONS, ids=lambda q: q.name)
def test_questions_are_answered_by_the_planner(q):
    a = answer(q)
    shape = model_shape(q.model)
    p = plan(shape, q.setup)
    assert a["planner_total"] == p.total and a["terms"] == p.terms and a["fits"] == p.fits(a["device_bytes"])
    n = a["stretch_max"]  # the largest fitting value: n fits and n + 1 does not
    assert n >= 1 and plan(shape, replace(q.setup, **{q.stretch: n})).fits(a["device_bytes"])
    assert not plan(shape, replace(q.setup, **{q.stretch: n + 1})).fits(a["device_bytes"])
    if q.setup.mode == "train":
        params, largest = param_counts(shape)
        assert a["deepspeed_zero3"] == deepspeed_zero3(params, largest, q.devices).per_gpu


def test_largest_fitting_is_zero_when_nothing_fits():
    assert largest_fitting(KNOWN_MODELS["llama-2-70b"], Setup(), "seq_len", 2**30) == 0


def test_every_swept_configuration_counts_as_validated_and_outside_mixes_are_named(capsys):
    """`unvalidated` agrees with the sweep: none of impl.plan.validate's configurations gets a reason, a mix the
    sweep leaves out (LoRA with TP) does, and the command prints it under the verdict (the default mix: no line)."""
    from impl.plan import unvalidated
    from impl.plan.validate import CONFIGS

    assert [name for name, shape, setup in CONFIGS if unvalidated(shape, setup)] == []
    lora_tp = Setup(finetune="lora", tp=2, world_size=2)
    assert any("LoRA/QLoRA with TP" in why for why in unvalidated(model_shape("gpt2"), lora_tp))
    _, out, _ = _run(["gpt2", "--finetune", "lora", "--tp", "2", "--world-size", "2", "--device-memory", "80GiB"],
                     capsys)  # fmt: skip
    assert "not validated by measurement: LoRA/QLoRA with TP" in out
    _, out, _ = _run([*QLORA_7B, "--device-memory", "24GiB"], capsys)
    assert "not validated" not in out

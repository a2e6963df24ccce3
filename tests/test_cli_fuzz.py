"""Every entry point of `python -m impl` against a table of wrong values: exit 2 and a single `error:` line naming
the option (no usage block, no traceback), before any work. The table must cover every option that takes a
number or a path (checked from --help)."""

import os
import re
import subprocess
import sys

import pytest

from impl.__main__ import ENTRY_POINTS, main

BAD = {  # the kind of an option -> wrong values for it
    "pos_int": ["0", "-1", "nan", "x", "1.5"],
    "nonneg_int": ["-1", "nan", "x"],
    "pos_float": ["0", "-1", "nan", "inf", "x"],
    "nonneg_float": ["-1", "nan", "inf", "x"],
    "finite": ["nan", "inf", "x"],
    "prob": ["-0.1", "1.5", "nan", "x"],
    "unit": ["-0.1", "1", "nan", "x"],
    "out_dir": ["FILE", "READONLY/sub"],
    "out_file": ["DIR", "READONLY/x.png", "FILE/x.png"],
    "in_file": ["MISSING", "DIR"],
    "in_dir": ["MISSING", "FILE"],
    "sd_dir": ["MISSING", "FILE", "DIR"],  # an empty folder is no model, and never a name on the hub
    "device": ["tpu", "x"],
    "threshold": ["x", "a=nan", "a=-1"],
}
# name -> (arguments that make a valid command line, {option: kind}, options that take no number or path)
TABLE = {
    "bench": ([], {"--budget-s": "nonneg_float", "--out": "out_dir", "--compare": "in_file"},
              {"--size", "--device", "-k"}),
    "report": (["JSON"], {"--out": "out_dir"}, {"--title"}),
    "compare": (["JSON", "JSON"], {"--out": "out_dir", "--threshold": "threshold"},
                {"--fail-on-regression", "--allow-device-mismatch", "--warn-only"}),
    "train": (["--out", "OUT", "--data", "CORPUS"], {
        **dict.fromkeys(["--n-layer", "--n-head", "--n-embd", "--block-size", "--batch-size", "--grad-accum-steps",
                         "--max-iters", "--lr-decay-iters", "--eval-interval", "--eval-iters",
                         "--final-eval-iters", "--tp"], "pos_int"),
        **dict.fromkeys(["--warmup-iters", "--checkpoint-every", "--sample-chars", "--seed"], "nonneg_int"),
        **dict.fromkeys(["--learning-rate", "--min-lr"], "pos_float"),
        **dict.fromkeys(["--weight-decay", "--grad-clip"], "nonneg_float"),
        **dict.fromkeys(["--dropout", "--beta1", "--beta2"], "unit"),
        "--out": "out_dir", "--data": "in_file", "--device": "device",
    }, {"--preset", "--no-progress", "--attention-backend", "--parallel"}),
    "sample": (["--checkpoint", "DIR"], {
        "--checkpoint": "in_dir", "--max-new-tokens": "nonneg_int", "--temperature": "pos_float",
        "--top-k": "pos_int", "--seed": "nonneg_int", "--device": "device", "--out": "out_file",
    }, {"--prompt"}),
    "train-zero": ([], {
        **dict.fromkeys(["--world-size", "--steps", "--width", "--batch"], "pos_int"),
        "--layers": "nonneg_int", "--lr": "pos_float", "--timeout-s": "pos_float",
    }, {"--stage", "--mixed-precision"}),
    "img2img": (["--image", "IMAGE", "--prompt", "a digit", "--out", "OUT/x.png"], {
        "--image": "in_file", "--out": "out_file", "--model-dir": "sd_dir", "--strength": "prob",
        "--steps": "pos_int", "--guidance-scale": "finite", "--seed": "nonneg_int", "--device": "device",
    }, {"--prompt", "--negative-prompt", "--sampler"}),
    "rlhf": (["--shakespeare", "CORPUS"], {
        "--steps": "pos_int", "--pretrain-steps": "pos_int", "--shakespeare": "in_file", "--seed": "nonneg_int",
    }, set()),
    "clip-train": ([], {
        "--epochs": "pos_int", "--batch-size": "pos_int", "--lr": "pos_float", "--weight-decay": "nonneg_float",
        "--test-fraction": "unit", "--seed": "nonneg_int", "--device": "device", "--out": "out_dir",
    }, set()),
    "glide": ([], {
        **dict.fromkeys(["--steps", "--batch-size", "--clip-epochs", "--num-inference-steps", "--per-digit"],
                        "pos_int"),
        "--lr": "pos_float", "--p-uncond": "prob", "--seed": "nonneg_int", "--device": "device",
        "--guidance-scales": "nonneg_float", "--clip-guidance-scale": "nonneg_float", "--out": "out_dir",
    }, {"--sampler"}),
    "unclip": ([], {
        **dict.fromkeys(["--prior-steps", "--decoder-steps", "--batch-size", "--clip-epochs",
                         "--num-inference-steps", "--per-digit"], "pos_int"),
        "--lr": "pos_float", "--seed": "nonneg_int", "--device": "device", "--out": "out_dir",
        "--prior-guidance-scale": "nonneg_float", "--decoder-guidance-scale": "nonneg_float",
    }, {"--sampler"}),
    "lora-toy": ([], {
        **dict.fromkeys(["--dim", "--hidden", "--classes", "--samples", "--pretrain-steps", "--finetune-steps",
                         "--rank"], "pos_int"),
        **dict.fromkeys(["--pretrain-lr", "--finetune-lr", "--alpha"], "pos_float"),
        "--teacher-bias": "nonneg_float", "--seed": "nonneg_int",
    }, {"--quiet"}),
    "plan": (["gpt2", "--device-memory", "24GiB"], {
        **dict.fromkeys(["--lora-rank", "--nf4-block-size", "--world-size", "--tp", "--pp", "--micro-batches",
                         "--checkpoint-every", "--seq-len", "--micro-batch", "--kv-len", "--kv-batch"], "pos_int"),
        "--config-json": "in_file", "--out": "out_dir",
    }, {"--inference", "--dtype", "--mixed-precision", "--finetune", "--lora-targets", "--double-quant",
        "--no-double-quant", "--optimizer", "--zero-stage", "--schedule", "--checkpointing", "--packing", "--dropout",
        "--kv-int8", "--device-memory", "--device", "--sweep", "--json"}),
}  # fmt: skip
# The report CLIs (impl/report, not these entry points' owner) find an unwritable -o only when writing, and name
# the path, not the option; strict, so the mark goes when they check it up front.
NOT_YET: set[tuple[str, str]] = set()  # (entry point, option) pairs still checked late: none
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only folders


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Real files and folders the placeholders in TABLE and BAD stand for."""
    base = tmp_path_factory.mktemp("cli")
    (base / "file.txt").write_text("not a folder")
    (base / "corpus.txt").write_text("To be, or not to be, that is the question. " * 40)
    (base / "run.json").write_text('{"machine_info": {"impl": {"device": "cpu"}}, "benchmarks": []}')
    (base / "dir").mkdir()
    (base / "readonly").mkdir()
    (base / "readonly").chmod(0o555)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(base / "in.png")
    yield {
        "FILE": base / "file.txt", "DIR": base / "dir", "READONLY": base / "readonly", "MISSING": base / "missing",
        "CORPUS": base / "corpus.txt", "JSON": base / "run.json", "IMAGE": base / "in.png", "OUT": base / "out",
    }  # fmt: skip
    (base / "readonly").chmod(0o755)


def _fill(value: str, places: dict) -> str:
    head, _, tail = value.partition("/")
    return str(places[head] / tail if tail else places[head]) if head in places else value


def _cases():
    for name, (_, kinds, _) in TABLE.items():
        for option, kind in kinds.items():
            for value in BAD[kind]:
                marks = [pytest.mark.xfail(strict=True, reason="-o checked late")] if (name, option) in NOT_YET else []
                yield pytest.param(name, option, value, id=f"{name} {option} {value}", marks=marks)


def test_the_table_covers_every_entry_point_and_option(capsys):
    assert set(TABLE) == set(ENTRY_POINTS)
    for name, (_, kinds, others) in TABLE.items():
        assert main([name, "--help"]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"  -", line)]
        shown = {m for line in lines for m in re.findall(r"(?:^  |, )(--?[a-z][\w-]*)", line)} - {"-h", "--help", "-o"}
        assert shown == set(kinds) | others, name


@pytest.mark.parametrize(("name", "option", "value"), list(_cases()))
def test_a_wrong_value_is_one_error_line_and_exit_2(name, option, value, places, capsys):
    if "READONLY" in value and ROOT_USER:
        pytest.skip("running as root: a read-only folder is writable")
    required, _, _ = TABLE[name]
    argv = [name, *(_fill(a, places) for a in required), option, _fill(value, places)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], err
    assert not places["OUT"].exists()  # nothing was started


@pytest.mark.parametrize(
    "name",
    list(ENTRY_POINTS),
)
def test_usage_names_the_command_typed(name, capsys):
    assert main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m impl {name} ")


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMPL_DEBUG": ""}
    cmd = [sys.executable, "-m", "impl", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, **kwargs)


@pytest.mark.parametrize(
    "argv",
    [
        ["train-zero", "--world-size", "0"],
        ["lora-toy", "--samples", "0"],
        ["img2img", "--image", "IMAGE", "--prompt", "p", "--out", "OUT/x.png", "--model-dir", "MISSING"],
        ["train", "--out", "FILE", "--data", "CORPUS"],
    ],
    ids=lambda argv: " ".join(argv[:3]),
)
def test_a_wrong_value_in_a_fresh_process(argv, places):
    result = _run(*(_fill(a, places) for a in argv))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and result.stdout == "", result.stderr

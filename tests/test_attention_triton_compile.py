"""The Triton kernels compile for a Hopper GPU (sm_90, as in the H100/H200) without one being present, and their
default tiles fit its shared memory. The interpreter runs the kernels' arithmetic but skips the compiler's checks
(loop-carried types, constexpr specialization, resources); this catches those on a CPU-only machine.

The compile runs in a fresh process without TRITON_INTERPRET (this session sets it for the interpreter tests).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HOPPER_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
HEAD_DIM = 128  # the largest supported head_dim: the most shared memory


def compile_kernels(dtype_name: str) -> dict[str, int]:
    """Compile the three kernels with the default config for `dtype_name`; shared bytes per kernel."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from impl.attention import _triton_kernels as kernels
    from impl.attention.flash_triton import TritonConfig

    dtype = getattr(torch, dtype_name)
    config = TritonConfig.default(dtype)
    t = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    ints = dict.fromkeys(("n_heads", "GROUP", "n_q", "n_k", "head_dim"), "i32")
    consts = dict(CAUSAL=True, BLOCK_D=HEAD_DIM, PRECISION="ieee" if t == "fp32" else "tf32")
    qkv = {"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}"}
    bwd = {**qkv, "DO": f"*{t}", "LSE": "*fp32", "DELTA": "*fp32"}
    launches = {
        "fwd": (kernels.flash_fwd_kernel, {**qkv, "Out": f"*{t}", "LSE": "*fp32", "qk_scale": "fp32"},
                (config.block_m, config.block_n)),
        "dkdv": (kernels.flash_bwd_dkdv_kernel, {**bwd, "DK": f"*{t}", "DV": f"*{t}", "sm_scale": "fp32",
                 "qk_scale": "fp32"}, (config.bwd_block_m, config.bwd_block_n)),
        "dq": (kernels.flash_bwd_dq_kernel, {**bwd, "DQ": f"*{t}", "sm_scale": "fp32", "qk_scale": "fp32"},
               (config.block_m, config.block_n)),
    }  # fmt: skip
    shared = {}
    for name, (fn, pointers, (block_m, block_n)) in launches.items():
        constexprs = {**consts, "BLOCK_M": block_m, "BLOCK_N": block_n}
        types = {**pointers, **ints, **dict.fromkeys(constexprs, "constexpr")}
        signature = {arg: types[arg] for arg in fn.arg_names}  # in the kernel's parameter order
        src = ASTSource(fn, signature, constexprs={(list(signature).index(k),): v for k, v in constexprs.items()})
        options = {"num_warps": 2 * config.num_warps, "num_stages": config.num_stages}  # head_dim > 64: 2x warps
        shared[name] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared
    return shared


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_kernels_compile_for_sm90_and_fit_shared_memory(dtype_name):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is its current default
    run = subprocess.run(
        [sys.executable, __file__, dtype_name], env=env, capture_output=True, text=True, timeout=240
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    shared = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(shared) == {"fwd", "dkdv", "dq"}
    for name, nbytes in shared.items():
        assert 0 < nbytes <= HOPPER_SHARED_MEMORY, f"{name} needs {nbytes} bytes of shared memory"


if __name__ == "__main__":
    print(json.dumps(compile_kernels(sys.argv[1])))

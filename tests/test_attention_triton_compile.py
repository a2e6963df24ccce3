"""The Triton kernels compile for a Hopper GPU (sm_90, as in the H100/H200) without one being present, and their
default tiles fit its shared memory. The interpreter runs the kernels' arithmetic but skips the compiler's checks
(loop-carried types, constexpr specialization, resources); this catches those on a CPU-only machine.

Each variant is compiled as the launcher would specialize it: the default `TritonConfig` for its (head_dim,
dtype), an int argument equal to 1 (GROUP without GQA) folded into a constant, ints that are multiples of 16
(lengths 1024..16384) marked so, pointers 16-byte aligned. Every dtype x head_dim 64/128 x causal is compiled
with GQA at an odd length (the general code path), bf16 also as the benchmark launches it (MHA, length a multiple
of 16), a padded head_dim (80) as in test_attention_triton_gpu.py, packed documents (DOCS: per-position
document ids and per-block ranges) causal and not, and a causal decode step (1 query, folded, over 1000 keys).
All compile in one fresh process without TRITON_INTERPRET (this session sets it for the interpreter tests), two
at a time: a few minutes on 2 cores.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import pytest

HOPPER_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
BENCH = ((8, 8), 1024)  # (q heads, k/v heads), length: the benchmark's MHA, GROUP 1 folded, a multiple of 16
TESTS = ((8, 2), 1000)  # the tests' GQA at a length that is not a multiple of 16: the general specialization
VARIANTS = [  # bf16, the GPU targets' dtype, in both specializations; fp16 and fp32 in the general one
    dict(dtype=t, head_dim=d, causal=c, heads=h, seq=n)
    for t, shapes in (("bfloat16", (BENCH, TESTS)), ("float16", (TESTS,)), ("float32", (TESTS,)))
    for d, c, (h, n) in itertools.product((64, 128), (False, True), shapes)
] + [dict(dtype="bfloat16", head_dim=80, causal=c, heads=(4, 1), seq=513) for c in (False, True)]  # padded D
VARIANTS += [  # packed documents (the DOCS code path), and causal decode steps over a cache (n_q < n_k, n_q = 1)
    dict(dtype=t, head_dim=64, causal=c, heads=h, seq=n, docs=True)
    for t, c, (h, n) in (("bfloat16", True, BENCH), ("float32", False, TESTS))
] + [dict(dtype="bfloat16", head_dim=128, causal=True, heads=(8, 2), seq=1000, n_q=1)]


def launches(
    dtype: str, head_dim: int, causal: bool, heads: tuple[int, int], seq: int, docs: bool = False, n_q: int = 0
) -> dict:
    """{kernel name: (kernel, {argument: value}, num_warps, num_stages)}, as `flash_attention_triton` launches
    them on (1, heads, seq, head_dim) inputs. Tensors are triton MockTensors: a dtype and an aligned pointer."""
    import torch
    from triton.runtime.jit import MockTensor

    from impl.attention import _triton_kernels as kern
    from impl.attention.flash_triton import DELTA_ROWS, TritonConfig, _launch_args

    dtype = getattr(torch, dtype)
    hq, hkv = heads
    q = torch.empty(1, hq, n_q or seq, head_dim, dtype=dtype, device="meta")
    k = torch.empty(1, hkv, seq, head_dim, dtype=dtype, device="meta")
    config = TritonConfig.default(head_dim, dtype)
    args = _launch_args(q, k, causal, docs)
    t, f32, i32 = MockTensor(dtype), MockTensor(torch.float32), MockTensor(torch.int32)
    dkv = t if hq == hkv else f32  # per-q-head dK/dV are fp32 under GQA
    bwd = dict(Q=t, K=t, V=t, DO=t, LSE=f32, DELTA=f32, DOC=i32, RANGES=i32, sm_scale=0.1, qk_scale=0.2, **args)
    fwd_stages, bwd_stages = (config.num_warps, config.num_stages), (config.bwd_num_warps, config.num_stages)
    return {
        "fwd": (kern.flash_fwd_kernel, {**bwd, "Out": t, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n},
                *fwd_stages),
        "delta": (kern.flash_bwd_delta_kernel, dict(Out=t, DO=t, DELTA=f32, n_rows=hq * seq, HEAD_DIM=head_dim,
                  BLOCK_D=args["BLOCK_D"], BLOCK=DELTA_ROWS), 4, 3),
        "dkdv": (kern.flash_bwd_dkdv_kernel, {**bwd, "DK": dkv, "DV": dkv, "BLOCK_M": config.bwd_block_m,
                 "BLOCK_N": config.bwd_block_n}, *bwd_stages),
        "dq": (kern.flash_bwd_dq_kernel, {**bwd, "DQ": t, "BLOCK_M": config.dq_block_m, "BLOCK_N": config.dq_block_n},
               *bwd_stages),
    }  # fmt: skip


def specialize(fn, values: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `triton.compile`, by the launcher's own specialization rules."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":  # an int equal to 1
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def compile_one(job: tuple[str, str]) -> tuple[str, int]:
    """Compile one (variant id, kernel name) for sm_90; its shared memory in bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant_id, name = job
    fn, values, num_warps, num_stages = launches(**VARIANTS[int(variant_id)])[name]
    src = ASTSource(fn, *specialize(fn, values))
    options = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return f"{variant_id}/{name}", kernel.metadata.shared


def compile_all() -> dict[str, int]:
    """Shared bytes of every distinct (variant, kernel) compile; identical specializations are compiled once."""
    from concurrent.futures import ProcessPoolExecutor

    jobs, seen = [], {}
    for i, variant in enumerate(VARIANTS):
        for name, (fn, values, warps, stages) in launches(**variant).items():
            key = (name, repr(specialize(fn, values)), warps, stages)
            if key not in seen:
                seen[key] = f"{i}/{name}"
                jobs.append((str(i), name))
    with ProcessPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(compile_one, jobs))


def variant_id(variant: dict) -> str:
    hq, hkv = variant["heads"]
    return (f"{variant['dtype']}-d{variant['head_dim']}-{'causal' if variant['causal'] else 'full'}"
            f"-h{hq}kv{hkv}-n{variant['seq']}{'-docs' if variant.get('docs') else ''}"
            f"{'-nq' + str(variant['n_q']) if variant.get('n_q') else ''}")  # fmt: skip


@pytest.fixture(scope="module")
def compiled() -> dict[str, int]:
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when unset; 1 is its current default
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=840)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~25 compiles on 2 cores that other jobs may share
@pytest.mark.triton
def test_every_variant_compiles_for_sm90_and_fits_shared_memory(compiled):
    too_big = {job: nbytes for job, nbytes in compiled.items() if not 0 <= nbytes <= HOPPER_SHARED_MEMORY}
    assert not too_big, f"over sm_90's {HOPPER_SHARED_MEMORY} bytes of shared memory: {too_big}"
    kernels_per_variant = {job.split("/")[1] for job in compiled}
    assert kernels_per_variant == {"fwd", "delta", "dkdv", "dq"}
    dtypes_dims_causal = {
        (v["dtype"], v["head_dim"], v["causal"]) for v in VARIANTS if v["heads"][0] != v["heads"][1] and len(v) == 5
    }
    assert len(dtypes_dims_causal) == 3 * 2 * 2 + 2  # every dtype x head_dim 64/128 x causal with GQA, and d80
    print({variant_id(VARIANTS[int(job.split("/")[0])]) + "/" + job.split("/")[1]: n for job, n in compiled.items()})


if __name__ == "__main__":
    print(json.dumps(compile_all()))

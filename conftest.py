"""Options, markers and fixtures shared by tests/ and benches/.

--device {auto,cpu,cuda}   where tensors live (auto: CUDA when present)
--size {smoke,small,full}  how big benchmarks are (default: small on CPU, full on CUDA)
"""

import os

import pytest
import torch

from impl.common import DEVICE_CHOICES, SIZE_CHOICES, resolve_device, resolve_size, seed_everything

SEED = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("impl")
    group.addoption("--device", choices=DEVICE_CHOICES, default="auto", help="device for tensors")
    group.addoption(
        "--size",
        choices=SIZE_CHOICES,
        default=None,
        help="benchmark size: smoke (CI, seconds), small (CPU default), full (GPU default)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # --size is resolved here, once: everything after reads config.getoption("--size") as smoke, small or full.
    config.option.size = resolve_size(config.getoption("--size"), resolve_device(config.getoption("--device")))
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped cleanly without one")
    config.addinivalue_line("markers", "distributed: spawns several processes (gloo on CPU, nccl on GPU)")
    config.addinivalue_line("markers", "triton: runs a Triton kernel (on CPU through TRITON_INTERPRET=1)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() and config.getoption("--device") != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here, or --device cpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> list[str]:
    device = resolve_device(config.getoption("--device"))
    size = config.getoption("--size")
    return [f"impl: device={device} size={size} torch={torch.__version__} threads={torch.get_num_threads()}"]


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device chosen by --device (auto: CUDA when present)."""
    return resolve_device(pytestconfig.getoption("--device"))


@pytest.fixture(scope="session")
def size(pytestconfig: pytest.Config) -> str:
    """The benchmark size chosen by --size (default: small on CPU, full on CUDA; resolved in pytest_configure)."""
    return pytestconfig.getoption("--size")


@pytest.fixture(autouse=True)
def seeded() -> int:
    """Every test starts from the same seed, so failures reproduce."""
    seed_everything(SEED)
    return SEED


@pytest.fixture(scope="session")
def shakespeare_path() -> str | None:
    """The tiny-shakespeare file when one is provided (env TINYSHAKESPEARE or ../shared/data), else None."""
    candidates = [os.environ.get("TINYSHAKESPEARE")]
    here = os.path.dirname(os.path.abspath(__file__))
    candidates.append(os.path.join(here, "..", "shared", "data", "tinyshakespeare.txt"))
    for path in candidates:
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    return None

"""The LoRA toy: a rank-2 update of one layer recovers accuracy lost to a distribution shift."""

import pytest
import torch

from impl.finetune.lora_toy import ToyConfig, main, run


@pytest.fixture
def one_thread():
    """The toy's matmuls are tiny: a second intra-op thread only adds synchronization (badly so on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # the full default run: ~900 full-batch steps of a tiny MLP
def test_lora_recovers_accuracy_on_the_shifted_distribution(one_thread):
    config = ToyConfig()
    result = run(config, progress=False)
    assert result["sphere_acc"] > 0.85
    assert result["gauss_acc_after"] > result["gauss_acc_before"] + 0.05
    assert result["trainable"] == config.rank * (config.hidden + config.hidden)  # A (r x 32) and B (32 x r)
    assert result["trainable"] / result["total"] < 0.1


def test_cli_help_and_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--finetune-steps" in capsys.readouterr().out
    main(["--samples", "64", "--pretrain-steps", "2", "--finetune-steps", "2", "--quiet"])
    assert "parameters trained by LoRA: 128 of 1860" in capsys.readouterr().out

"""The precision of a run: native-bf16 CPU detection, the choice and its reason, the log, what training computes in."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from mait.commands.train import overrides_from
from mait_cli.options import train as add_train_options
from mait.train import TrainConfig, train
from mait.train import precision
from mait.train.precision import Precision, choose_precision, cpu_bf16_support

CPU = torch.device("cpu")
TINY = {"model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}, "epochs": 1, "batch_size": 32,
        "train_subset": 96, "val_subset": 64, "warmup_epochs": 0, "progress": False, "scheme": "all"}


@pytest.fixture
def cpu_with(monkeypatch: pytest.MonkeyPatch):
    """Pretend the CPU has exactly the given feature flags (None: flags that cannot be read)."""
    def pretend(flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    return pretend


def test_native_bf16_is_avx512_bf16_or_amx_and_the_reason_says_which() -> None:
    assert cpu_bf16_support(frozenset({"avx2", "avx512_f", "avx512_bf16"})) == (True, "CPU has avx512_bf16")
    assert cpu_bf16_support(frozenset({"amx_tile", "amx_bf16"})) == (True, "CPU has amx_bf16")
    native, why = cpu_bf16_support(frozenset({"avx2", "avx512_f", "amx_int8"}))
    assert not native and why == "CPU has neither avx512_bf16 nor amx_bf16"


def test_unreadable_cpu_flags_say_why(cpu_with) -> None:
    cpu_with(None)
    native, why = cpu_bf16_support()
    assert not native and why.startswith("cannot read the CPU's features on ")
    assert choose_precision(True, CPU).describe() == f"fp32 ({why})"


def test_proc_cpuinfo_agrees_with_torchs_capability_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback for a torch without ``torch.cpu.get_capabilities`` finds the same bf16 flags."""
    if not Path("/proc/cpuinfo").is_file() or not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("needs Linux's /proc/cpuinfo and torch.cpu.get_capabilities to compare")
    from_torch = precision.cpu_flags()
    precision.cpu_flags.cache_clear()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    try:
        from_cpuinfo = precision.cpu_flags()
    finally:
        precision.cpu_flags.cache_clear()
    assert from_cpuinfo is not None
    for flag in precision.NATIVE_BF16_FLAGS:
        assert (flag in from_cpuinfo) == (flag in from_torch), flag


def test_choice_of_precision(cpu_with) -> None:
    """On a CPU, bf16 autocast only when asked for (``amp: true``) and native; CUDA autocasts unless amp is off."""
    cpu_with({"avx512_bf16"})
    assert choose_precision(True, CPU) == Precision(torch.bfloat16, "CPU has avx512_bf16")
    assert choose_precision(True, CPU).describe() == "bf16 autocast (CPU has avx512_bf16)"
    assert choose_precision(None, CPU).describe() == \
        "fp32 (the CPU default; --amp autocasts to bf16 here: CPU has avx512_bf16)"
    assert choose_precision(False, CPU).describe() == "fp32 (amp off)"
    cpu_with({"avx2"})
    lacking = "fp32 (CPU has neither avx512_bf16 nor amx_bf16)"
    assert choose_precision(True, CPU).dtype is None and choose_precision(True, CPU).describe() == lacking
    assert choose_precision(None, CPU).describe() == lacking
    assert choose_precision(True, torch.device("meta")).describe() == "fp32 (no autocast on meta)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_autocasts_unless_amp_is_off() -> None:
    cuda = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert choose_precision(None, cuda).dtype == choose_precision(True, cuda).dtype == expected
    assert choose_precision(False, cuda).dtype is None


@pytest.mark.parametrize("flags,amp,log_line,compute_dtype", [
    ({"avx512_bf16"}, True, "precision: bf16 autocast (CPU has avx512_bf16)", torch.bfloat16),
    ({"avx512_bf16"}, None, "precision: fp32 (the CPU default; --amp autocasts to bf16 here: CPU has avx512_bf16)",
     torch.float32),
    ({"avx512_bf16"}, False, "precision: fp32 (amp off)", torch.float32),
    ({"avx2"}, True, "precision: fp32 (CPU has neither avx512_bf16 nor amx_bf16)",
     torch.float32),
])
def test_training_log_names_the_precision_the_steps_run_in(flags, amp, log_line, compute_dtype, cpu_with,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The log line and the dtype the attention's projections actually compute in during training."""
    cpu_with(flags)
    seen: set[torch.dtype] = set()
    original = torch.nn.Linear.forward

    def recording(self, x):
        out = original(self, x)
        if torch.is_grad_enabled():          # training steps, not evaluation
            seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    keys = dict(TINY, output=str(tmp_path / "run"))
    result = train(TrainConfig.from_dict(keys if amp is None else dict(keys, amp=amp)))
    assert log_line in capsys.readouterr().out.splitlines()
    assert seen == {compute_dtype}
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))



def test_amp_is_a_flag_whose_absence_leaves_the_device_default() -> None:
    parser = argparse.ArgumentParser()
    add_train_options(parser)
    assert overrides_from(parser.parse_args(["--amp"]))["amp"] is True
    assert overrides_from(parser.parse_args(["--no-amp"]))["amp"] is False
    assert "amp" not in overrides_from(parser.parse_args([]))
    assert TrainConfig().amp is None


@pytest.mark.parametrize("flags,argv,compute_dtype", [
    ({"avx512_bf16"}, ["--amp"], torch.bfloat16),
    ({"avx512_bf16"}, [], torch.float32),
    ({"avx2"}, ["--amp"], torch.float32),
])
def test_eval_computes_in_the_precision_amp_chooses(flags, argv, compute_dtype, cpu_with, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`mait eval` names its precision and its forward computes in it, like training."""
    from mait_cli import main
    result = train(TrainConfig.from_dict(dict(TINY, output=str(tmp_path / "run"))))
    capsys.readouterr()
    cpu_with(flags)
    seen: set[torch.dtype] = set()
    original = torch.nn.Linear.forward

    def recording(self, x):
        out = original(self, x)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording)
    assert main(["eval", "--checkpoint", str(result.last_checkpoint), "--no-progress", "--device", "cpu", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == f"precision: {choose_precision(True if argv else None, CPU).describe()}"
    assert "top-1" in lines[-1]
    assert seen == {compute_dtype}


def test_training_log_names_the_machine(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Every start or resume logs the CPU (or GPU) it computes on: results differ bit-wise between CPU
    models, so a run continued on another machine says where each part ran."""
    from mait.train.precision import cpu_name
    train(TrainConfig.from_dict(dict(TINY, output=str(tmp_path / "run"))))
    lines = capsys.readouterr().out.splitlines()
    threads = torch.get_num_threads()
    assert f"machine: {cpu_name()}, {threads} thread{'s' if threads > 1 else ''}" in lines
    assert cpu_name() and cpu_name() != "model name"

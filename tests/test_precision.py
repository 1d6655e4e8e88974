"""One precision table and one autocast helper, used by the factory, the trainer and evaluation."""
import pytest
import torch

from clipforge import factory, precision
from clipforge.evaluate import features
from clipforge.train import step


def test_precisions_and_autocast_dtypes():
    assert precision.PRECISIONS == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision.autocast("fp32", "cpu"):
        assert (a @ b).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with precision.autocast("bf16", torch.device("cpu")):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16', 'fp16'\], got 'amp'"):
        precision.autocast("amp", "cpu")


def test_amp_means_torch_autocast_default_dtype():
    for device in ("cpu", "cuda"):
        assert precision.PRECISIONS[precision.amp_precision(device)] == torch.get_autocast_dtype(device)


def test_one_table_and_one_helper_everywhere():
    assert factory.PRECISIONS is precision.PRECISIONS
    assert step.autocast is precision.autocast and features.autocast is precision.autocast


def test_image_features_run_in_the_given_precision():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 4)

        def encode_image(self, images):
            return self.proj(images.flatten(1))

    torch.manual_seed(0)
    model, loader = Tiny(), [(torch.randn(3, 3, 2, 2), torch.tensor([0, 1, 2]))]
    exact, _ = features.image_features(model, loader, use_tqdm=False)
    fast, _ = features.image_features(model, loader, precision="bf16", use_tqdm=False)
    assert exact.dtype == fast.dtype == torch.float32  # features always leave as fp32
    assert not torch.equal(exact, fast) and torch.allclose(exact, fast, atol=2e-2)


@pytest.mark.parametrize("flags, expected", [
    (frozenset({"avx2", "fma"}), "fp32"),                      # emulated bf16: slower than fp32
    (frozenset({"avx2", "avx512f", "avx512bw"}), "fp32"),      # AVX-512 without its BF16 extension
    (frozenset({"avx2", "avx512f", "avx512_bf16"}), "bf16"),
    (frozenset({"amx_bf16", "amx_tile"}), "bf16"),
    (frozenset({"fp", "asimd", "bf16"}), "bf16"),              # Arm's BF16 extension (Features line)
])
def test_auto_precision_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    chosen, why = precision.resolve_precision("auto", "cpu")
    assert chosen == expected and why.startswith("auto: ")
    assert ("no bf16 matrix instructions" in why) == (expected == "fp32")


def test_auto_precision_on_gpus_and_explicit_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_precision("auto", "cuda")[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_precision("auto", "cuda")[0] == "fp16"
    assert precision.resolve_precision("bf16", "cpu") == ("bf16", "as configured")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("amp_bf16", "cpu")


def test_cpu_flags_are_read_from_this_machine():
    """On Linux the flags come from /proc/cpuinfo; whatever they are, the description names what auto uses."""
    info = precision.cpu_description()
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["bf16_flags"]) <= set(precision.BF16_CPU_FLAGS)
    assert set(info["bf16_flags"]) <= precision.cpu_flags()

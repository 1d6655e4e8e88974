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

"""The README's example must run as written (with its placeholder paths pointed at real files)."""
import re
from pathlib import Path

import torch

import clipforge
from clipforge.checkpoints import save_torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, photos, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    save_torch(clipforge.create_model("ViT-B-32").state_dict(), tmp_path / "ckpt.pt")
    photos[1].save(tmp_path / "cat.jpg")
    monkeypatch.chdir(tmp_path)
    code = code.replace("path/to/openclip_or_openai_checkpoint.pt", str(tmp_path / "ckpt.pt"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    probs = scope["probs"]
    assert probs.shape == (1, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(1))

"""The key-mapping mechanism every foreign format uses: templates, tensor ops, drops, inverse, reports."""
import pytest
import torch

from clipforge.checkpoints import CheckpointError
from clipforge.checkpoints.keymap import KeyMap, Rule, prefixed, split_indices

BLOCK = [
    (("q.weight", "k.weight", "v.weight"), "qkv.weight"),  # 3 x [D, D] -> [3D, D]
    ("fused.weight", ("first.weight", "rest.weight"), "copy", (1, 2)),  # [3D, D] -> [D, D] + [2D, D]
    ("proj.weight", "proj_t", "T"),
]
TABLE = KeyMap("toy", src_name="theirs", dst_name="ours", rules=[
    ("pos", "pos_embed", "unsqueeze0"),  # [N, D] -> [1, N, D]
    ("scale", "scale", "squeeze0"),  # [1] -> []
    ("buffer", None),
    *prefixed("layers.{}.", "blocks.{}.", BLOCK),
])


def _source(depth=2, d=4):
    gen = torch.Generator().manual_seed(0)
    sd = {"pos": torch.randn(5, d, generator=gen), "scale": torch.randn(1, generator=gen), "buffer": torch.arange(3)}
    for i in range(depth):
        for name, rows in (("q", d), ("k", d), ("v", d), ("fused", 3 * d), ("proj", d)):
            sd[f"layers.{i}.{name}.weight"] = torch.randn(rows, d + 1, generator=gen)
    return sd


def test_templates_ops_and_generated_inverse_round_trip():
    sd = _source()
    out = TABLE.apply(sd)
    assert out["pos_embed"].shape == (1, 5, 4) and out["scale"].shape == ()
    assert "buffer" not in out  # an explicit drop
    assert torch.equal(out["blocks.1.qkv.weight"], torch.cat([sd[f"layers.1.{n}.weight"] for n in "qkv"]))
    assert out["blocks.0.first.weight"].shape == (4, 5) and out["blocks.0.rest.weight"].shape == (8, 5)
    assert torch.equal(out["blocks.0.proj_t"], sd["layers.0.proj.weight"].t())
    back = TABLE.inverse().apply(out, expected={k: v for k, v in sd.items() if k != "buffer"})
    assert set(back) == set(sd) - {"buffer"}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    assert TABLE.inverse().inverse().rules == [r for r in TABLE.rules if r.dst is not None]


def test_reports_name_unused_unfilled_and_misshaped_keys():
    sd = _source()
    with pytest.raises(CheckpointError, match=r"ckpt: 1 unexpected theirs key\(s\) \(no toy mapping\): layers\.0\.extra"):
        TABLE.apply(dict(sd, **{"layers.0.extra": torch.zeros(1)}), source="ckpt")
    partial = {k: v for k, v in sd.items() if k != "layers.1.k.weight"}
    with pytest.raises(CheckpointError, match=r"missing layers\.1\.k\.weight \(needed for blocks\.1\.qkv\.weight\)"):
        TABLE.apply(partial)
    expected = TABLE.apply(sd)
    without_proj = {k: v for k, v in sd.items() if k != "layers.0.proj.weight"}
    with pytest.raises(CheckpointError, match=r"1 ours key\(s\) unfilled: missing layers\.0\.proj\.weight"):
        TABLE.apply(without_proj, expected)
    with pytest.raises(CheckpointError, match=r"target does not have: blocks\.1\."):
        TABLE.apply(sd, {k: v for k, v in expected.items() if not k.startswith("blocks.1.")})
    wrong = dict(expected, pos_embed=torch.zeros(1, 6, 4))
    with pytest.raises(CheckpointError, match=r"mis-shaped.*pos_embed \(1, 5, 4\) vs expected \(1, 6, 4\)"):
        TABLE.apply(sd, wrong)


def test_tables_are_checked_when_built():
    with pytest.raises(ValueError, match="appears in two rules"):
        KeyMap("bad", [("a", "x"), ("a", "y")])
    with pytest.raises(ValueError, match="filled by two rules"):
        KeyMap("bad", [("a", "x"), ("b", "x")])
    with pytest.raises(ValueError, match="number of"):
        Rule(("layers.{}.a",), ("a",))
    with pytest.raises(ValueError, match="not digits"):
        Rule(("layers.0.a",), ("a",))
    with pytest.raises(ValueError, match="one key on each side"):
        Rule(("a", "b"), ("c",), "T")
    assert split_indices("a.3.b.10.c") == ("a.{}.b.{}.c", (3, 10))

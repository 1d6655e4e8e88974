"""The faster step: precision ``auto`` logged, AdamW kernels equal, bf16 within bf16 tolerance of fp32,
torch.compile equal to eager. Timings are in benchmarks/bench_trainer.py, not here."""
import copy
import json

import open_clip
import pytest
import torch

from clipforge.config import CLIPConfig
from clipforge.loss import ClipLoss
from clipforge.models import build_model
from clipforge.precision import autocast
from clipforge.train.config import OptimSettings, TrainConfig
from clipforge.train.loop import train
from clipforge.train.optim import build_optimizer, optimizer_kernel
from clipforge.train.step import forward_backward
from train_utils import TINY_MODEL, tiny_config, write_caption_tsv


def _tiny_pair(seed: int = 0):
    """(clipforge model, open_clip model) with the same seeded weights."""
    torch.manual_seed(seed)
    ref = open_clip.CLIP(TINY_MODEL["embed_dim"], open_clip.model.CLIPVisionCfg(**TINY_MODEL["vision_cfg"]),
                         open_clip.model.CLIPTextCfg(**TINY_MODEL["text_cfg"]))
    ours = build_model(CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL)))
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _batch(n: int = 8):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    texts = open_clip.tokenize([f"a photo of thing number {i}" for i in range(n)], context_length=16)
    return images, texts


def test_auto_kernel_choice(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(3))]
    assert optimizer_kernel(OptimSettings(), params) == {"fused": True, "foreach": False}  # CPU, torch >= 2.4
    from types import SimpleNamespace
    from clipforge.train import optim
    monkeypatch.setattr(optim, "_TORCH_VERSION", (2, 3))  # no fused CPU kernel before torch 2.4
    assert optimizer_kernel(OptimSettings(), params) == {"fused": False, "foreach": True}
    monkeypatch.undo()
    meta_auto = [torch.nn.Parameter(torch.randn(3, device="meta"))]
    assert optimizer_kernel(OptimSettings(), meta_auto) == {"fused": False, "foreach": True}  # other devices
    on_gpu = [SimpleNamespace(device=torch.device("cuda", 0))]  # only the device is looked at
    assert optimizer_kernel(OptimSettings(), on_gpu) == {"fused": True, "foreach": False}
    meta = [torch.nn.Parameter(torch.randn(3, device="meta"))]
    assert optimizer_kernel(OptimSettings(implementation="fused"), meta) == {"fused": True, "foreach": False}
    assert optimizer_kernel(OptimSettings(implementation="for-loop"), params) == {"fused": False, "foreach": False}
    with pytest.raises(ValueError, match="optim.implementation must be one of"):
        OptimSettings(implementation="apex")


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_adamw_kernels_give_the_for_loop_update(implementation):
    """Three steps of each kernel move every parameter as torch's reference for-loop AdamW does: foreach
    exactly, fused within 2% of one step's size (lr 1e-3: it rounds sqrt/eps for near-zero gradients
    in another order; measured 7e-6). The attention key bias is left out for fused: softmax is blind to
    it, so its gradient is rounding noise (~1e-8 against ~0.05 for the query bias) and Adam's update
    there is noise over noise (fused and for-loop differ by up to one step's size)."""
    results = {}
    for kind in ("for-loop", implementation):
        model, _ = _tiny_pair()
        opt = build_optimizer(model, OptimSettings(implementation=kind, lr=1e-3, weight_decay=0.2))
        images, texts = _batch()
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            forward_backward(model, ClipLoss(), [(images, texts)], "fp32", torch.device("cpu"))
            opt.step()
        results[kind] = model.state_dict()
    for key, value in results["for-loop"].items():
        atol = 0.0 if implementation == "foreach" else 2e-5
        ours = results[implementation][key]
        if implementation == "fused" and key.endswith("attn.in_proj_bias"):
            width = value.shape[0] // 3
            keep = torch.cat([torch.arange(width), torch.arange(2 * width, 3 * width)])  # query and value
            ours, value = ours[keep], value[keep]
        torch.testing.assert_close(ours, value, rtol=0.0 if atol == 0 else 1e-5, atol=atol, msg=key)


def test_bf16_first_step_loss_and_gradients_match_fp32():
    """bf16 autocast computes the same step as fp32 within bf16's ~3 significant digits, and the loss
    equals OpenCLIP's ClipLoss on OpenCLIP's model (same weights, same batch)."""
    model, ref = _tiny_pair()
    images, texts = _batch()
    grads, losses = {}, {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        losses[precision] = forward_backward(model, ClipLoss(), [(images, texts)], precision, torch.device("cpu"))
        grads[precision] = {n: p.grad.clone() for n, p in model.named_parameters()}
    img_f, txt_f, scale = ref(images, texts)
    reference = open_clip.ClipLoss()(img_f, txt_f, scale)
    torch.testing.assert_close(losses["fp32"], reference.detach(), rtol=1e-6, atol=1e-6)
    assert abs(losses["bf16"] - losses["fp32"]) < 2e-2 * abs(losses["fp32"])
    for name, g32 in grads["fp32"].items():
        g16 = grads["bf16"][name]
        if g32.abs().max() == 0:
            continue
        cos = torch.nn.functional.cosine_similarity(g16.flatten().float(), g32.flatten(), dim=0)
        rel = (g16 - g32).norm() / g32.norm()
        assert cos > 0.99 and rel < 0.15, f"{name}: cosine {cos:.4f}, relative error {rel:.3f}"


def _attention_kernels(precision: str, grad: bool) -> set:
    """The scaled-dot-product-attention kernels a forward (and backward, with ``grad``) of the tiny model runs."""
    model, _ = _tiny_pair()
    images, texts = _batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.set_grad_enabled(grad), autocast(precision, "cpu"):
            out = model(images, texts)
            loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
        if grad:
            loss.backward()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def test_cpu_bf16_training_runs_attention_as_gemms():
    """In a bf16 training step on CPU attention runs as plain bf16 GEMMs, no torch attention kernel
    (the flash CPU kernel's bf16 backward was 47% of the step on an AMX Xeon; the math kernel upcasts
    to fp32); fp32 training and bf16 inference keep the flash kernel, so the test sees the difference."""
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash in _attention_kernels("bf16", grad=False)
    assert flash in _attention_kernels("fp32", grad=True)
    assert _attention_kernels("bf16", grad=True) == set()


@pytest.mark.parametrize("case", ["plain", "causal", "causal-rect", "bool", "float", "hidden-row"])
def test_gemm_attention_is_sdpa(case):
    """The hand-written attention of bf16 CPU training computes what scaled_dot_product_attention
    defines, forward and gradients, in float64 (so only the formula is compared): scale, causal
    alignment (top-left, also for fewer queries than keys), bool and additive masks, and a row the
    mask hides entirely (zeros, as SDPA's math kernel gives)."""
    from clipforge.models.layers import _gemm_attention
    gen = torch.Generator().manual_seed(0)
    lq = 3 if case == "causal-rect" else 7
    q = torch.randn(2, 3, lq, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None
    if case in ("bool", "hidden-row"):
        mask = torch.rand(2, 1, lq, 7, generator=gen) > 0.4
        mask[..., 0] = True
        if case == "hidden-row":
            mask[1, 0, 2] = False
    elif case == "float":
        mask = torch.randn(2, 1, lq, 7, generator=gen, dtype=torch.float64)
        mask[0, 0, 1, 3] = float("-inf")
    causal = case.startswith("causal")
    grad_out = torch.randn(2, 3, lq, 8, generator=gen, dtype=torch.float64)
    results = []
    for fn in (_gemm_attention, lambda *a: torch.nn.functional.scaled_dot_product_attention(
            a[0], a[1], a[2], attn_mask=a[3], is_causal=a[4])):
        out = fn(q, k, v, mask, causal)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append((out, *grads))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    if case == "hidden-row":
        assert results[0][0][1, :, 2].abs().max() == 0


def test_train_logs_the_chosen_precision(tmp_path, capsys):
    tsv = write_caption_tsv(tmp_path / "data", n_images=16)
    default = tiny_config(tmp_path, tsv, max_steps=2)
    del default["precision"]
    assert TrainConfig.from_dict(default).precision == "auto"  # the trainer's default
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, max_steps=2, precision="auto"))
    summary = train(cfg)
    from clipforge.precision import resolve_precision
    chosen, why = resolve_precision("auto", "cpu")
    assert (summary["precision"], summary["precision_reason"]) == (chosen, why)
    assert json.loads((cfg.run_dir / "summary.json").read_text())["precision"] == chosen
    captured = capsys.readouterr()
    assert f"precision {chosen} ({why})" in captured.out + captured.err  # auto chose: the log says so


def test_compiled_training_equals_eager(tmp_path):
    """``compile: true`` trains the same model as eager: the losses of the first steps (the second one
    depends on the first update, so on the compiled backward) agree, and the saved weights have plain names."""
    pytest.importorskip("torch._inductor")
    tsv = write_caption_tsv(tmp_path / "data", n_images=16)
    losses, keys = {}, {}
    for compiled in (False, True):
        cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, max_steps=3, precision="fp32", compile=compiled,
                                                name=f"c{int(compiled)}"))
        train(cfg)
        rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in rows if r["kind"] == "train"]
        from safetensors import safe_open
        with safe_open(str(cfg.run_dir / "final" / "open_clip_model.safetensors"), "pt") as f:
            keys[compiled] = set(f.keys())
    assert keys[True] == keys[False]  # no _orig_mod. prefixes
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)

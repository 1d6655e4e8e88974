"""The trainer in one process: config, schedules, accumulation, locking, bad data, NaN, CLI end to end."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import clipforge
import clipforge.checkpoints
import clipforge.cli
from clipforge.config import CLIPConfig
from clipforge.data import DataError
from clipforge.loss import ClipLoss, SigLipLoss
from clipforge.models.clip import CLIP
from clipforge.train import TrainConfig, TrainingDiverged, interpolate_weights, load_config, lr_at, param_groups, train
from clipforge.train.checkpoint import list_checkpoints, read_training_checkpoint
from clipforge.train.config import OptimSettings
from clipforge.train.step import forward_backward

from train_utils import TINY_MODEL, TINY_SIGLIP, tiny_config, write_caption_tsv, write_yaml


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    return write_caption_tsv(tmp_path_factory.mktemp("data"), n_images=32, captions_per_image=2)


def _tiny_model(cfg=TINY_MODEL, seed=0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.from_dict(copy.deepcopy(cfg)))


# -- config ------------------------------------------------------------------------------------------
def test_yaml_with_overrides_typed_and_validated(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"optim": {"lr": 1e-3}, "batch_size": 16, "data": {"kind": "synthetic"}})
    cfg = load_config(path, ["optim.lr=2e-4", "batch-size=32", "model.name=ViT-B-16", "aug.scale=[0.5, 1.0]"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float) and cfg.batch_size == 32
    assert cfg.model.name == "ViT-B-16" and cfg.aug.scale == (0.5, 1.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what the run saves reads back identically
    with pytest.raises(ValueError, match=r"config\.optim: unknown key\(s\) \['learning_rate'\]"):
        load_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"config\.batch_size: expected an integer"):
        load_config(path, ["batch_size=lots"])
    with pytest.raises(ValueError, match="precision must be one of"):
        load_config(path, ["precision=fp8"])
    with pytest.raises(ValueError, match="schedule must be one of"):
        load_config(path, ["optim.schedule=linear"])
    with pytest.raises(ValueError, match="expected key.path=value"):
        load_config(path, ["optim.lr"])


def test_lr_schedules_match_open_clip_train():
    scheduler = pytest.importorskip("open_clip_train.scheduler")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    total = 50
    cases = {
        "cosine": (scheduler.cosine_lr(opt, 0.1, 7, total), OptimSettings(lr=0.1, warmup_steps=7)),
        "const": (scheduler.const_lr(opt, 0.1, 7, total), OptimSettings(lr=0.1, warmup_steps=7, schedule="const")),
        "const-cooldown": (scheduler.const_lr_cooldown(opt, 0.1, 7, total, 20, 1.5, 1e-3),
                           OptimSettings(lr=0.1, warmup_steps=7, schedule="const-cooldown", cooldown_steps=20,
                                         cooldown_power=1.5, lr_end=1e-3)),
    }
    for name, (reference, ours) in cases.items():
        for step in range(total):
            assert lr_at(step, ours, total) == pytest.approx(reference(step), rel=1e-12, abs=1e-15), (name, step)


def test_weight_decay_only_on_weight_matrices():
    model = _tiny_model()
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    for excluded in ("logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding",
                     "visual.positional_embedding", "ln_final.weight", "visual.ln_pre.bias",
                     "transformer.resblocks.0.attn.in_proj_bias"):
        assert excluded not in decayed, excluded
    assert {"visual.conv1.weight", "visual.proj", "text_projection",
            "transformer.resblocks.0.attn.in_proj_weight"} <= {n.replace("text.", "") for n in decayed}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# -- accumulation and the step -----------------------------------------------------------------------
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
def test_accum_freq_gives_the_gradient_of_one_larger_batch(loss_kind):
    cfg = TINY_MODEL if loss_kind == "clip" else TINY_SIGLIP
    loss_fn = ClipLoss() if loss_kind == "clip" else SigLipLoss()
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(24, 3, 32, 32, generator=g), torch.randint(1, 49000, (24, 16), generator=g)
    texts[:, -1] = 49407
    big = _tiny_model(cfg)
    loss_big = forward_backward(big, loss_fn, [(images, texts)], "fp32", torch.device("cpu"))
    small = _tiny_model(cfg)
    micro = [(images[i:i + 6], texts[i:i + 6]) for i in range(0, 24, 6)]
    loss_small = forward_backward(small, loss_fn, micro, "fp32", torch.device("cpu"))
    assert loss_small.item() == pytest.approx(loss_big.item(), abs=1e-5)
    expected, got = _grads(big), _grads(small)
    assert expected.keys() == got.keys() and "logit_scale" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # without the care for the scale, its gradient would be counted 4 times
    assert got["logit_scale"].abs().item() > 0


def test_grad_checkpointing_leaves_gradients_unchanged():
    images, texts = torch.randn(6, 3, 32, 32), torch.randint(1, 49000, (6, 16))
    grads = []
    for ckpt in (False, True):
        model = _tiny_model()
        model.set_grad_checkpointing(ckpt)
        forward_backward(model.train(), ClipLoss(), [(images, texts)], "fp32", torch.device("cpu"))
        grads.append(_grads(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)


# -- whole runs ----------------------------------------------------------------------------------------
def test_cli_run_trains_validates_and_writes_open_clip_loadable_model(tsv, tmp_path, capsys):
    cfg = tiny_config(tmp_path, tsv, epochs=3, val={"data": str(tsv), "batch_size": 16, "every_n_epochs": 1},
                      save_every_n_steps=3, keep_last=2)
    path = write_yaml(tmp_path / "run.yaml", cfg)
    assert clipforge.cli.main(["train", "--config", str(path), "optim.lr=2e-3"]) == 0
    assert "validation: val_loss" in capsys.readouterr().out
    run = tmp_path / "runs" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    val_rows = [r for r in rows if r["kind"] == "val"]
    steps_per_epoch = 64 // 8
    assert [r["step"] for r in train_rows] == list(range(1, 3 * steps_per_epoch + 1))
    assert [r["step"] for r in val_rows] == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # it learns
    assert all(r["logit_scale"] <= 100.0 + 1e-4 for r in train_rows)
    assert (run / "training_curves.png").stat().st_size > 0 and (run / "validation.png").stat().st_size > 0
    assert load_config(run / "config.yaml").optim.lr == 2e-3  # the overrides are what was saved
    assert len(list_checkpoints(run)) == 2  # keep_last

    # The exported model loads in OpenCLIP and gives clipforge's numbers; validation used the same model.
    open_clip = pytest.importorskip("open_clip")
    ref, _, ref_pre = open_clip.create_model_and_transforms(f"local-dir:{run / 'final'}")
    ours, _, pre = clipforge.create_model_and_transforms(f"local-dir:{run / 'final'}")
    from clipforge.evaluate.retrieval import evaluate_retrieval
    from clipforge.train.config import ValSettings
    from clipforge.train.validate import build_val_loader

    loader = build_val_loader(ValSettings(data=str(tsv), batch_size=16), pre)
    direct = evaluate_retrieval(ours, clipforge.get_tokenizer(CLIPConfig.from_dict(TINY_MODEL)), loader,
                                use_tqdm=False)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@5"):
        assert val_rows[-1][key] == pytest.approx(direct[key], abs=1e-9)
    batch = next(iter(loader))[0][:4]
    text = clipforge.get_tokenizer(CLIPConfig.from_dict(TINY_MODEL))(["a red square", "a blue stripe"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(batch), ref.encode_image(batch), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(text), ref.encode_text(text), rtol=0, atol=1e-5)

    # The training checkpoint is OpenCLIP-shaped too: open_clip_train's loader reads its weights.
    ckpt = list_checkpoints(run)[-1]
    state = read_training_checkpoint(ckpt)
    assert state["step"] == 3 * steps_per_epoch and state["epoch"] == 3 and state["batch"] == 0
    fresh = open_clip.CLIP(**_open_clip_kwargs())
    open_clip.load_checkpoint(fresh, str(ckpt), weights_only=True)


def _open_clip_kwargs():
    import open_clip

    return dict(embed_dim=TINY_MODEL["embed_dim"], vision_cfg=open_clip.model.CLIPVisionCfg(**TINY_MODEL["vision_cfg"]),
                text_cfg=open_clip.model.CLIPTextCfg(**TINY_MODEL["text_cfg"]))


def test_broken_samples_are_skipped_counted_and_reported(tsv, tmp_path):
    root = tsv.parent
    (root / "images" / "truncated.jpg").write_bytes((root / "images" / "000.jpg").read_bytes()[:200])
    bad = root / "with_broken.tsv"
    bad.write_text(tsv.read_text() + "images/missing.jpg\ta ghost\nimages/truncated.jpg\thalf a picture\n")
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, bad, data={"train_data": str(bad)}, name="broken"))
    summary = train(cfg)
    assert summary["data"]["skipped"] == 2 and summary["data"]["seen"] == 64  # 66 rows, 8 full batches
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["samples_skipped"] == 2

    many = root / "mostly_missing.tsv"
    many.write_text("filepath\ttitle\n" + "".join(f"images/nothere{i}.jpg\tx\n" for i in range(40))
                    + "images/000.jpg\ta red square\n")
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, many, data={"train_data": str(many), "min_seen": 8},
                                            name="too_broken"))
    with pytest.raises(DataError, match=r"max_bad_fraction.*nothere\d+\.jpg"):
        train(cfg)


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tsv, tmp_path, monkeypatch):
    import clipforge.train.loop as loop

    real, calls = loop.forward_backward, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(loop, "forward_backward", poisoned)
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, save_every_n_steps=2, name="nan"))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5 .*step_00000004\.pt"):
        train(cfg)
    last = list_checkpoints(cfg.run_dir)[-1]
    assert last.name == "step_00000004.pt" and read_training_checkpoint(last)["step"] == 4


def test_locked_image_tower_stays_put_and_text_tower_learns(tsv, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, model={"lock_image": True}, name="lit", max_steps=3))
    torch.manual_seed(cfg.seed)
    start = CLIP(CLIPConfig.from_dict(copy.deepcopy(TINY_MODEL))).state_dict()
    train(cfg)
    end = clipforge.create_model(f"local-dir:{cfg.run_dir / 'final'}").state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start if k.startswith("visual."))
    assert not torch.equal(start["token_embedding.weight"], end["token_embedding.weight"])


def test_unlocked_groups_and_patch_dropout_apply(tmp_path):
    from clipforge.train.config import ModelSettings
    from clipforge.train.loop import build_model

    model = build_model(ModelSettings(name=None, config=copy.deepcopy(TINY_MODEL), lock_image=True,
                                      lock_image_unlocked_groups=1, patch_dropout=0.5))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.proj" in trainable and "visual.conv1.weight" not in trainable
    assert not any(n.startswith("visual.transformer") for n in trainable)
    tokens = model.visual.embed(torch.randn(2, 3, 32, 32))
    assert tokens.shape[1] == 1 + 8  # 16 patches, half dropped, class token kept


def test_siglip_training_runs_with_bias(tsv, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, model={"config": copy.deepcopy(TINY_SIGLIP)},
                                            loss={"kind": "siglip"}, name="siglip", epochs=2))
    train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    model = clipforge.create_model(f"local-dir:{cfg.run_dir / 'final'}")
    assert model.logit_bias is not None and model.logit_bias.item() != -10.0


def test_bf16_autocast_on_cpu_and_fp16_refused(tsv, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, precision="bf16", name="bf16", max_steps=2))
    assert math.isfinite(train(cfg)["samples_per_s"])
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, precision="fp16", name="fp16")))


def test_resume_refuses_plain_weights_and_missing_files(tsv, tmp_path):
    weights = tmp_path / "plain.pt"
    torch.save(_tiny_model().state_dict(), weights)
    with pytest.raises(ValueError, match="not a clipforge training checkpoint.*model.pretrained"):
        train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, resume=str(weights))))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, resume=str(tmp_path / "nope.pt"))))


def test_fine_tune_from_pretrained_file_and_wise_ft(tsv, tmp_path):
    start = _tiny_model(seed=3)
    weights = tmp_path / "zs.safetensors"
    from clipforge.checkpoints import save_safetensors

    save_safetensors(start.state_dict(), weights)
    cfg = TrainConfig.from_dict(tiny_config(tmp_path, tsv, model={"pretrained": str(weights)}, name="ft",
                                            max_steps=2, optim={"lr": 1e-4, "warmup_steps": 1}))
    train(cfg)
    tuned = clipforge.create_model(f"local-dir:{cfg.run_dir / 'final'}").state_dict()
    zero = start.state_dict()
    # two small steps from the given weights, not from a fresh init
    assert max((tuned[k] - zero[k]).abs().max().item() for k in zero) < 0.01

    out = tmp_path / "mixed.safetensors"
    assert clipforge.cli.main(["wise-ft", str(weights), str(cfg.run_dir / "final"), "--alpha", "0.25",
                               "--out", str(out)]) == 0
    mixed = clipforge.checkpoints.read_checkpoint(out)
    for k in zero:
        torch.testing.assert_close(mixed[k], 0.75 * zero[k] + 0.25 * tuned[k], rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="alpha must be in"):
        interpolate_weights(zero, tuned, 1.5)
    with pytest.raises(ValueError, match="different tensors"):
        interpolate_weights({k: v for k, v in zero.items() if k != "logit_scale"}, tuned, 0.5)


def test_ranks_from_torchrun_or_slurm_environment(monkeypatch):
    from clipforge.train.distributed import _env_ranks

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert _env_ranks() == (0, 0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        _env_ranks()
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert _env_ranks() == (5, 1, 8)
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win over SLURM's
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _env_ranks() == (3, 3, 4)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from clipforge.train.checkpoint import save_checkpoint

    save_checkpoint({"step": 1, "state_dict": {"w": torch.ones(2)}}, tmp_path, keep_last=2)

    def dies_midway(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "state_dict": {"w": torch.zeros(2)}}, tmp_path, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert torch.equal(clipforge.checkpoints.read_checkpoint(list_checkpoints(tmp_path)[0])["state_dict"]["w"],
                       torch.ones(2))

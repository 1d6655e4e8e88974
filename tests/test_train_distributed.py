"""Multi-process training on the CPU (gloo): 2 ranks x B must equal 1 rank x 2B, and resume after SIGKILL.

Ranks are launched by ``torchrun``, as users launch them; each run is a few seconds.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from clipforge.checkpoints import read_checkpoint
from clipforge.train import TrainConfig, train
from clipforge.train.checkpoint import list_checkpoints

from train_utils import TINY_SIGLIP, tiny_coca_config, tiny_config, write_caption_tsv, write_yaml


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    return write_caption_tsv(tmp_path_factory.mktemp("data"), n_images=32, captions_per_image=2)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _weights(run_dir):
    return read_checkpoint(run_dir / "final" / "open_clip_model.safetensors")


def _torchrun(config_path, nproc=2, timeout=240) -> str:
    """Train under torchrun; returns what the ranks printed (stdout, then stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 2000), "-m", "clipforge", "train", "--config", str(config_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("distributed,loss_kind,accum", [("ddp", "clip", 1), ("fsdp", "clip", 1), ("ddp", "siglip", 1),
                                                         ("ddp", "clip", 2), ("fsdp", "clip", 2)])
def test_two_ranks_match_one_rank_with_twice_the_batch(tsv, tmp_path, distributed, loss_kind, accum):
    """2 ranks x B (as ``accum`` micro-batches) == 1 rank x 2B: loss, gradients and updated weights."""
    model = {"config": copy.deepcopy(TINY_SIGLIP)} if loss_kind == "siglip" else {}
    common = dict(model=model, loss={"kind": loss_kind}, max_steps=1, aug={"scale": [1.0, 1.0]},
                  optim={"lr": 1e-4, "warmup_steps": 1}, distributed=distributed, threads=1)
    single = TrainConfig.from_dict(tiny_config(tmp_path, tsv, batch_size=16, name="single", **common))
    train(single)
    two = write_yaml(tmp_path / "two.yaml", tiny_config(tmp_path, tsv, batch_size=8 // accum, accum_freq=accum,
                                                        name="two", **common))
    _torchrun(two)
    one, both = _weights(single.run_dir), _weights(tmp_path / "runs" / "two")
    assert one.keys() == both.keys()
    worst = max((one[k] - both[k]).abs().max().item() for k in one)
    assert worst <= 1e-5, worst
    # Adam's first moment after one step is (1 - beta1) * gradient: the gradients themselves agree.
    grads = [{k: v["exp_avg"] / 0.1 for k, v in read_checkpoint(list_checkpoints(d)[-1])["optimizer"]["state"].items()}
             for d in (single.run_dir, tmp_path / "runs" / "two")]
    assert grads[0].keys() == grads[1].keys()
    scale = max(g.abs().max().item() for g in grads[0].values())
    worst_grad = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0])
    assert worst_grad <= 1e-5 * scale, (worst_grad, scale)
    losses = [json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["loss"]
              for d in (single.run_dir, tmp_path / "runs" / "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    moved = max((one[k] - _weights_at_init(single)[k]).abs().max().item() for k in one)
    assert moved > 5e-5  # one step of lr 1e-4 changed the weights, so the comparison means something


@pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics (pycocoevalcap) need java")
def test_fsdp_shards_a_coca_decoder_too_and_validates_its_captions(tsv, tmp_path):
    """FSDP2 shards every CoCa parameter but the logit scale (the caption decoder and its vocabulary
    head included) and trains and validates as DDP does: the same gradients, weights and caption metrics.

    DDP is the reference, not 1 rank x 2B: the captioning loss is each rank's mean over its own
    non-pad tokens (as OpenCLIP's CoCaLoss), so 2 ranks weigh tokens differently from 1 rank.
    """
    common = dict(model={"config": tiny_coca_config()}, max_steps=1, aug={"scale": [1.0, 1.0]},
                  optim={"lr": 1e-4, "warmup_steps": 1}, threads=1, batch_size=8,
                  val={"data": str(tsv), "batch_size": 16, "every_n_steps": 1, "every_n_epochs": None})
    printed = {}
    for kind in ("ddp", "fsdp"):
        path = write_yaml(tmp_path / f"{kind}.yaml", tiny_config(tmp_path, tsv, name=kind, distributed=kind, **common))
        printed[kind] = _torchrun(path)
    line = next(x for x in printed["fsdp"].splitlines() if x.startswith("fsdp: "))
    assert line.endswith("replicated on every rank: logit_scale"), line
    runs = [tmp_path / "runs" / kind for kind in ("ddp", "fsdp")]
    ddp, fsdp = (_weights(run) for run in runs)
    assert ddp.keys() == fsdp.keys() and any(k.startswith("text_decoder.cross_attn.") for k in ddp)
    worst = max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp)
    assert worst <= 1e-5, worst
    grads = [{k: v["exp_avg"] / 0.1 for k, v in read_checkpoint(list_checkpoints(run)[-1])["optimizer"]["state"].items()}
             for run in runs]
    scale = max(g.abs().max().item() for g in grads[0].values())
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) <= 1e-5 * scale
    vals = [[json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in r] for run in runs]
    assert len(vals[0]) == len(vals[1]) == 1
    for key in ("caption_Bleu_4", "caption_CIDEr", "image_retrieval_recall@1"):
        assert vals[1][0][key] == pytest.approx(vals[0][0][key], abs=1e-4), key


def _weights_at_init(cfg: TrainConfig):
    from clipforge.train.loop import build_model, seed_everything

    seed_everything(cfg.seed)
    return build_model(cfg.model).state_dict()


def test_sigkill_mid_epoch_then_resume_ends_identical(tsv, tmp_path):
    """A run killed right after its step-4 checkpoint, then resumed, ends bit-identical to one never stopped."""
    common = dict(epochs=2, save_every_n_steps=2, keep_last=3, threads=1,
                  model={"patch_dropout": 0.25}, aug={"scale": [0.5, 1.0]})  # random crops and drops: RNG matters
    reference = TrainConfig.from_dict(tiny_config(tmp_path, tsv, name="reference", **common))
    train(reference)

    killed_cfg = write_yaml(tmp_path / "killed.yaml", tiny_config(tmp_path, tsv, name="killed", **common))
    run = tmp_path / "runs" / "killed"
    cmd = [sys.executable, "-m", "clipforge", "train", "--config", str(killed_cfg)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    target = run / "checkpoints" / "step_00000004.pt"
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run / "final").exists(), "the run finished before it could be killed"
    steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(run)]
    assert steps and max(steps) < 16  # killed inside the 16-step run (epoch 1 of 2 ends at 8)

    resumed = TrainConfig.from_dict(tiny_config(tmp_path, tsv, name="killed", resume="latest", **common))
    summary = train(resumed)
    assert summary["steps_this_run"] == 16 - max(steps)
    ref, got = _weights(reference.run_dir), _weights(run)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 16  # one row per step: rows after the checkpoint were dropped, not duplicated

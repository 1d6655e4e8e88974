"""Distillation (``loss.kind=distill``): DistillClipLoss against open_clip's, and the frozen teacher in training."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import clipforge.cli
from clipforge.checkpoints import read_checkpoint
from clipforge.checkpoints.openclip_hub import save_openclip_dir
from clipforge.config import CLIPConfig, PreprocessConfig
from clipforge.loss import ClipLoss, DistillClipLoss
from clipforge.models.clip import CLIP
from clipforge.train import TrainConfig
from clipforge.train.checkpoint import list_checkpoints, read_training_checkpoint
from clipforge.train.distributed import init_distributed
from clipforge.train.loop import Trainer, build_loss, resolve_loss_kind
from clipforge.train.step import forward_backward
from clipforge.train.teacher import Teacher, build_teacher

from test_loss import _openclip_loss
from train_utils import TINY_MODEL, tiny_config, write_caption_tsv, write_yaml

# A wider teacher with its own embedding size: the soft targets are logits, so only the batch must fit.
TINY_TEACHER = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    return write_caption_tsv(tmp_path_factory.mktemp("data"), n_images=32, captions_per_image=2)


def _model(cfg: Dict, seed: int) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.from_dict(copy.deepcopy(cfg)))


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """The tiny teacher as an OpenCLIP hub directory and as a plain state-dict file, plus its weights."""
    root = tmp_path_factory.mktemp("teacher")
    model = _model(TINY_TEACHER, seed=7)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # a confident teacher (exp(3) = 20), unlike a fresh student's 14.3
    save_openclip_dir(model, root / "hub", preprocess_cfg=PreprocessConfig(image_size=32))
    torch.save(model.state_dict(), root / "teacher.pt")
    return {"dir": root / "hub", "file": root / "teacher.pt", "state": copy.deepcopy(model.state_dict())}


def _features(n: int, dim: int, seed: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(n, dim, generator=gen), dim=-1)
    return [images, texts]


def _inputs(n: int, scale: float, teacher_scale: float, seed: int) -> List[torch.Tensor]:
    """Student (dim 16) and teacher (dim 24) features of the same n pairs, and both logit scales."""
    return (_features(n, 16, seed) + [torch.tensor(scale)] + _features(n, 24, seed + 1000)
            + [torch.tensor(teacher_scale)])


def _values_and_grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    parts = fn(*leaves)
    sum(parts).backward()
    return [p.detach() for p in parts], [leaf.grad for leaf in leaves]


def _worst(mine, reference, inputs) -> Dict[str, float]:
    """Largest |mine - reference| over both loss terms and every input's gradient (teacher's too)."""
    values, grads = _values_and_grads(mine, inputs)
    ref_values, ref_grads = _values_and_grads(reference, inputs)
    diffs = {name: (a - b).abs().item() for name, a, b in zip(("contrastive", "distill"), values, ref_values)}
    names = ("image", "text", "scale", "teacher_image", "teacher_text", "teacher_scale")
    for name, grad, ref in zip(names, grads, ref_grads):
        assert grad is not None and ref is not None, name
        diffs[name] = (grad - ref).abs().max().item()
    return diffs


# -- the loss -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,scale,teacher_scale", [(2, 1.0, 100.0), (7, 14.29, 20.0), (32, 100.0, 50.0),
                                                        (33, 30.0, 1.0)])
def test_distill_loss_and_gradients_match_open_clip(batch, scale, teacher_scale):
    oc = _openclip_loss()
    inputs = _inputs(batch, scale, teacher_scale, seed=batch)
    diffs = _worst(lambda *x: DistillClipLoss()(*x), lambda *x: oc.DistillClipLoss()(*x), inputs)
    print(f"B={batch} scale={scale} teacher={teacher_scale}: worst |diff| {max(diffs.values()):.1e}")
    assert max(diffs.values()) <= 1e-6, diffs
    out = DistillClipLoss()(*inputs, output_dict=True)
    ref = oc.DistillClipLoss()(*inputs, output_dict=True)
    assert out.keys() == ref.keys() == {"contrastive_loss", "distill_loss"}
    # the contrastive term is ClipLoss itself; a shared bias cancels in every softmax
    assert torch.equal(out["contrastive_loss"], ClipLoss()(*inputs[:3]))
    biased = DistillClipLoss()(*inputs, logit_bias=torch.tensor(-3.0), dist_logit_bias=torch.tensor(5.0))
    torch.testing.assert_close(torch.stack(biased), torch.stack(list(out.values())), rtol=0, atol=1e-5)


def test_distill_term_is_the_cross_entropy_to_the_teachers_softmax():
    """Independent of both implementations: the soft-target cross-entropy written out, in float64."""
    images, texts, scale, t_images, t_texts, t_scale = [x.double() for x in _inputs(9, 14.0, 40.0, seed=3)]
    student, teacher = scale * images @ texts.T, t_scale * t_images @ t_texts.T
    by_hand = sum(-(torch.softmax(t, 1) * torch.log_softmax(s, 1)).sum(1).mean() for s, t in
                  ((student, teacher), (student.T, teacher.T))) / 2
    _, distill = DistillClipLoss()(images, texts, scale, t_images, t_texts, t_scale)
    assert distill.item() == pytest.approx(by_hand.item(), rel=1e-12)


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        oc = _openclip_loss()
        inputs = _inputs(5, 20.0, 30.0, seed=100 + rank)
        results = {}
        for local_loss, with_grad in itertools.product((False, True), repeat=2):
            opts = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world_size)
            results[f"local_loss={local_loss},gather_with_grad={with_grad}"] = _worst(
                lambda *x, o=opts: DistillClipLoss(**o)(*x), lambda *x, o=opts: oc.DistillClipLoss(**o)(*x), inputs)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_distill_loss_matches_open_clip(tmp_path):
    """2 gloo ranks, every local_loss / gather_with_grad combination: values and gradients as open_clip's."""
    _openclip_loss()
    world_size = 2
    mp.spawn(_dist_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    for rank in range(world_size):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(results) == 4
        for name, diffs in results.items():
            assert max(diffs.values()) <= 1e-6, (rank, name, diffs)


# -- the teacher in a training step ----------------------------------------------------------------------
def test_accumulated_distillation_is_one_larger_batch():
    """accum_freq=2 with a teacher gives the gradient of one batch twice as large (OpenCLIP refuses accum)."""
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = torch.randint(1, 49407, (8, 16), generator=torch.Generator().manual_seed(1))
    teacher = Teacher(_model(TINY_TEACHER, seed=3))
    grads = []
    for micro in ([(images, texts)], [(images[:4], texts[:4]), (images[4:], texts[4:])]):
        student = _model(TINY_MODEL, seed=0)
        loss = forward_backward(student, DistillClipLoss(), micro, "fp32", torch.device("cpu"), teacher=teacher)
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
        assert all(p.grad is None for p in teacher.model.parameters())
    scale = max(g.abs().max().item() for g in grads[0].values())
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    print(f"accum_freq=2 vs one batch: worst gradient difference {worst:.1e} (largest gradient {scale:.1e})")
    assert worst <= 1e-5 * scale, (worst, scale)
    # and distillation changed the gradient: it is not plain InfoNCE's
    student = _model(TINY_MODEL, seed=0)
    forward_backward(student, ClipLoss(), [(images, texts)], "fp32", torch.device("cpu"))
    assert max((p.grad - grads[0][n]).abs().max().item() for n, p in student.named_parameters()) > 1e-4 * scale


def _distill_cfg(tmp_path, tsv, teacher, **top):
    return TrainConfig.from_dict(tiny_config(tmp_path, tsv, loss={"kind": "distill", "teacher": teacher}, **top))


def test_training_with_a_frozen_teacher(tsv, tmp_path, teacher_files):
    """Teacher frozen, in eval mode, out of optimizer and checkpoints; step 1's loss as open_clip computes it."""
    open_clip = pytest.importorskip("open_clip")
    cfg = _distill_cfg(tmp_path, tsv, {"name": f"local-dir:{teacher_files['dir']}"}, max_steps=3)
    trainer = Trainer(cfg, init_distributed(cfg.device))
    teacher = trainer.teacher
    assert isinstance(teacher, Teacher) and isinstance(trainer.loss_fn, DistillClipLoss)
    student_dir = tmp_path / "student_init"
    save_openclip_dir(copy.deepcopy(trainer.model), student_dir, preprocess_cfg=trainer.preprocess)
    batches = []
    objective = teacher.objective
    teacher.objective = lambda fn, micro: (batches.append([(i.clone(), t.clone()) for i, t in micro]),
                                           objective(fn, micro))[1]
    summary = trainer.run()
    assert summary["steps"] == 3 and summary["loss_kind"] == "distill" and len(batches) == 3

    # frozen: same weights as the file, no gradients, eval mode, nothing of it in the optimizer
    for name, value in teacher.model.state_dict().items():
        assert torch.equal(value, teacher_files["state"][name]), name
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    assert not any(m.training for m in teacher.model.modules())
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters()}
    assert not optimized & {id(p) for p in teacher.model.parameters()}

    # checkpoints and the export hold the student only
    student_keys = set(trainer.model.state_dict())
    state = read_training_checkpoint(list_checkpoints(cfg.run_dir)[-1])
    assert set(state["state_dict"]) == student_keys
    assert len(state["optimizer"]["state"]) == len(list(trainer.model.parameters()))
    assert set(read_checkpoint(cfg.run_dir / "final" / "open_clip_model.safetensors")) == student_keys
    moved = max((trainer.model.state_dict()[k] - v).abs().max().item()
                for k, v in read_checkpoint(student_dir / "open_clip_model.safetensors").items())
    assert moved > 1e-5  # the student learned

    # step 1's logged loss = open_clip's DistillClipLoss on open_clip's own student and teacher outputs
    oc_student = open_clip.create_model(f"local-dir:{student_dir}")
    oc_teacher = open_clip.create_model(f"local-dir:{teacher_files['dir']}")
    images, texts = batches[0][0]
    with torch.no_grad():
        outs = [(m.encode_image(images, normalize=True), m.encode_text(texts, normalize=True), m.logit_scale.exp())
                for m in (oc_student, oc_teacher)]
        contrastive, distill = _openclip_loss().DistillClipLoss()(*outs[0], *outs[1])
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["kind"] == "train"][0]
    assert first["step"] == 1
    print(f"step 1: logged {first['loss']:.6f}, open_clip {(contrastive + distill).item():.6f} "
          f"(contrastive {contrastive.item():.4f} + distill {distill.item():.4f})")
    assert first["loss"] == pytest.approx((contrastive + distill).item(), abs=1e-5)
    assert distill.item() > contrastive.item() * 0.1  # the distillation term is a real part of it


def test_resume_with_a_teacher_ends_identical(tsv, tmp_path, teacher_files, monkeypatch):
    """A distillation run stopped after its step-2 checkpoint and resumed ends bit-identical to an unbroken one."""
    teacher = {"config": copy.deepcopy(TINY_TEACHER), "pretrained": str(teacher_files["file"])}
    common = dict(max_steps=4, save_every_n_steps=2, keep_last=1, aug={"scale": [0.5, 1.0]})  # random crops
    reference = _distill_cfg(tmp_path, tsv, teacher, name="reference", **common)
    Trainer(reference, init_distributed(reference.device)).run()

    class Stop(Exception):
        pass

    step = Trainer._optimizer_step

    def stop_after_two(self):
        if self.step == 2:
            raise Stop
        step(self)

    broken = _distill_cfg(tmp_path, tsv, teacher, name="broken", **common)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_optimizer_step", stop_after_two)
        with pytest.raises(Stop):
            Trainer(broken, init_distributed(broken.device)).run()
    assert [int(p.stem.split("_")[1]) for p in list_checkpoints(broken.run_dir)] == [2]  # mid-epoch
    resumed = dataclasses.replace(broken, resume="latest")
    summary = Trainer(resumed, init_distributed(resumed.device)).run()
    assert summary["steps_this_run"] == 2 and summary["steps"] == 4
    ref = read_checkpoint(reference.run_dir / "final" / "open_clip_model.safetensors")
    got = read_checkpoint(broken.run_dir / "final" / "open_clip_model.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    other = dataclasses.replace(resumed, loss=dataclasses.replace(
        resumed.loss, teacher=dataclasses.replace(resumed.loss.teacher, pretrained=str(teacher_files["dir"]))))
    with pytest.raises(ValueError, match=r"loss\.teacher: checkpoint .* config"):
        Trainer(other, init_distributed(other.device))


# -- what is refused, and how it is said -------------------------------------------------------------------
def test_config_errors_name_the_teacher_setting(tsv, tmp_path, teacher_files):
    with pytest.raises(ValueError, match=r"loss\.kind=distill needs a teacher: set loss\.teacher\.name"):
        TrainConfig.from_dict(tiny_config(tmp_path, tsv, loss={"kind": "distill"}))
    with pytest.raises(ValueError, match=r"loss\.teacher is set but loss\.kind=clip"):
        TrainConfig.from_dict(tiny_config(tmp_path, tsv, loss={"kind": "clip", "teacher": {"pretrained": "x.pt"}}))
    with pytest.raises(ValueError, match=r"loss\.chunk_size does not apply to loss\.kind=distill"):
        TrainConfig.from_dict(tiny_config(tmp_path, tsv, loss={"kind": "distill", "chunk_size": 4,
                                                               "teacher": {"pretrained": "x.pt"}}))
    with pytest.raises(ValueError, match=r"config\.loss\.teacher: unknown key\(s\) \['path'\]"):
        _distill_cfg(tmp_path, tsv, {"path": "x.pt"})

    student, pp = _model(TINY_MODEL, seed=0), PreprocessConfig(image_size=32)
    missing = tmp_path / "nowhere" / "teacher.pt"
    with pytest.raises(ValueError, match=rf"loss\.teacher \(pretrained={missing}\): pretrained='{missing}' is "
                                         "neither a known tag nor an existing file"):
        build_teacher(_distill_cfg(tmp_path, tsv, {"pretrained": str(missing)}).loss.teacher, student, pp)
    with pytest.raises(ValueError, match=r"loss\.teacher \(name=local-dir:.*\): local-dir:.*: no such directory"):
        build_teacher(_distill_cfg(tmp_path, tsv, {"name": f"local-dir:{missing}"}).loss.teacher, student, pp)
    with pytest.raises(ValueError, match=r"loss\.teacher\.pretrained is required"):
        build_teacher(_distill_cfg(tmp_path, tsv, {"name": "ViT-B-32"}).loss.teacher, student, pp)

    # the CLI says it in one line and exits 1
    path = write_yaml(tmp_path / "bad.yaml", tiny_config(tmp_path, tsv, loss={"kind": "distill",
                                                                              "teacher": {"pretrained": str(missing)}}))
    assert clipforge.cli.main(["train", "--config", str(path)]) == 1


def test_incompatible_teacher_and_coca_are_refused(tsv, tmp_path, teacher_files):
    student = _model(TINY_MODEL, seed=0)
    other = copy.deepcopy(TINY_TEACHER)
    other["vision_cfg"]["image_size"] = 48
    other["text_cfg"]["context_length"] = 12
    other["text_cfg"]["vocab_size"] = 1000
    path = tmp_path / "other.pt"
    torch.save(_model(other, seed=1).state_dict(), path)
    settings = _distill_cfg(tmp_path, tsv, {"config": other, "pretrained": str(path)}).loss.teacher
    with pytest.raises(ValueError, match=r"cannot score the student's batches.*image size \(48, 48\) \(the student's "
                                         r"images are \(32, 32\)\).*context length 12 \(the student's tokens are 16.*"
                                         r"vocabulary of 1000 tokens \(the student's token ids go up to 49407\)"):
        build_teacher(settings, student, PreprocessConfig(image_size=32))
    other_tokenizer = copy.deepcopy(TINY_TEACHER)
    other_tokenizer["text_cfg"]["hf_tokenizer_name"] = "bert-base-uncased"
    tokenizer_cfg = _distill_cfg(tmp_path, tsv, {"config": other_tokenizer, "pretrained": str(teacher_files["file"])})
    with pytest.raises(ValueError, match=r"tokenizer \{'hf_tokenizer_name': 'bert-base-uncased'.*\(the student's is "
                                         r"\{'hf_tokenizer_name': None"):
        build_teacher(tokenizer_cfg.loss.teacher, student, PreprocessConfig(image_size=32))
    fine = _distill_cfg(tmp_path, tsv, {"name": f"local-dir:{teacher_files['dir']}"}).loss.teacher
    with pytest.raises(ValueError, match=r"image mean \(0\.4814.*\) \(the student's images are normalised with "
                                         r"\(0\.5, 0\.5, 0\.5\)\)"):
        build_teacher(fine, student, PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5)))
    assert isinstance(build_teacher(fine, student, PreprocessConfig(image_size=32)), Teacher)

    coca = CLIPConfig.from_dict(torch.load(Path(__file__).parent / "golden" / "coca_tiny.pt",
                                           weights_only=True)["config"])
    from clipforge.models import build_model

    with pytest.raises(ValueError, match=r"loss\.kind=distill: distillation into a CoCa model is not supported"):
        resolve_loss_kind("distill", build_model(coca))
    with pytest.raises(ValueError, match=r"distillation into a CoCa model is not supported"):
        build_teacher(fine, build_model(coca), PreprocessConfig(image_size=32))
    torch.save(build_model(coca).state_dict(), tmp_path / "coca.pt")
    coca_teacher = _distill_cfg(tmp_path, tsv, {"config": coca.to_dict(), "pretrained": str(tmp_path / "coca.pt")})
    with pytest.raises(ValueError, match=r"a CoCa teacher is not supported"):
        build_teacher(coca_teacher.loss.teacher, student, PreprocessConfig(image_size=32))
    assert resolve_loss_kind("distill", student) == ("distill", None)
    loss = build_loss("distill", settings_loss := _distill_cfg(tmp_path, tsv, {"pretrained": "x"}).loss,
                      init_distributed("cpu"))
    assert isinstance(loss, DistillClipLoss) and loss.local_loss == settings_loss.local_loss


def test_two_ranks_distill_like_one_rank_with_twice_the_batch(tsv, tmp_path, teacher_files):
    """torchrun, 2 gloo ranks x 8 == 1 rank x 16: each rank's teacher scores its own shard, gathered in the loss."""
    from test_train_distributed import _torchrun, _weights

    common = dict(loss={"kind": "distill", "teacher": {"name": f"local-dir:{teacher_files['dir']}"}}, max_steps=1,
                  aug={"scale": [1.0, 1.0]}, optim={"lr": 1e-4, "warmup_steps": 1}, threads=1)
    single = TrainConfig.from_dict(tiny_config(tmp_path, tsv, batch_size=16, name="single", **common))
    Trainer(single, init_distributed(single.device)).run()
    _torchrun(write_yaml(tmp_path / "two.yaml", tiny_config(tmp_path, tsv, batch_size=8, name="two", **common)))
    one, both = _weights(single.run_dir), _weights(tmp_path / "runs" / "two")
    assert one.keys() == both.keys()
    worst = max((one[k] - both[k]).abs().max().item() for k in one)
    losses = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (single.run_dir, tmp_path / "runs" / "two")]
    losses = [[r["loss"] for r in rows if r["kind"] == "train"][0] for rows in losses]
    print(f"2 ranks vs 1: max weight difference {worst:.2e}, losses {losses}")
    assert worst <= 1e-5, worst
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)

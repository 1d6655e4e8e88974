"""Nothing lost, nothing silent: atomic outputs, stale temporaries, corrupt checkpoints, a full disk, kills.

Run alone with ``pytest -m reliability``. The fault-injection part SIGKILLs real processes: a
"zygote" subprocess imports torch and clipforge once, then forks one child per job (a training run,
a conversion, a hub-folder save, a shard set); a child arms a hook that SIGKILLs itself at a chosen
call (mid-write of a checkpoint, between the two renames of a folder swap, inside a tar, ...), or
the test kills it after a random delay. After every kill the test does what the next run does
(``cleanup_stale``) and checks the output is the old one or the new one, never a mix; then a rerun
must succeed. The tally (injections and data losses per fault kind) is printed at the end and
written to ``reliability_report.json`` in pytest's base temp folder.

Embedding and export writers belong elsewhere: add their jobs to ``run_job`` and a test like
``test_kill_during_hub_folder_write`` (see ``EXTRA_WRITERS`` below).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from clipforge.atomic import (NoSpaceError, atomic_directory, cleanup_stale, current_umask, recover_directory,
                              write_text)
from clipforge.checkpoints import CheckpointError, read_checkpoint, save_torch
from clipforge.checkpoints.formats import load_any
from clipforge.checkpoints.openclip_hub import load_openclip_dir, save_openclip_dir
from clipforge.train.checkpoint import (find_resume, list_checkpoints, prepare_checkpoint_dir, read_training_checkpoint,
                                        save_checkpoint)

from train_utils import TINY_MODEL, tiny_config, write_caption_tsv

pytestmark = pytest.mark.reliability

TESTS = Path(__file__).resolve().parent
TALLY = defaultdict(lambda: {"injections": 0, "lost": 0})  # fault kind -> counts
EXTRA_WRITERS: list = []  # (kind, job factory) pairs for embed/export kills, added by their owners


@pytest.fixture(scope="module", autouse=True)
def _report(tmp_path_factory, pytestconfig):
    yield
    report = {k: dict(v) for k, v in sorted(TALLY.items())}
    total = sum(v["injections"] for v in report.values())
    lost = sum(v["lost"] for v in report.values())
    path = tmp_path_factory.getbasetemp() / "reliability_report.json"
    path.write_text(json.dumps({"injections": total, "lost": lost, "by_kind": report}, indent=2) + "\n")
    line = f"fault injection: {total} injections, {lost} lost: {json.dumps(report)} ({path})"
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + line, flush=True)  # shown even when output is captured


def _temporaries(folder: Path):
    return sorted(p.name for p in Path(folder).rglob("*") if ".clipforge-" in p.name)


def _tiny_model(seed: int, embed_dim: int = 32, vocab_size: int = 1000):
    """A tiny CLIP; a different ``embed_dim`` makes a mix of two outputs' files fail to load."""
    from clipforge.config import CLIPConfig
    from clipforge.models.clip import CLIP

    torch.manual_seed(seed)
    text_cfg = {**TINY_MODEL["text_cfg"], "vocab_size": vocab_size}
    return CLIP(CLIPConfig.from_dict({**TINY_MODEL, "embed_dim": embed_dim, "text_cfg": text_cfg})).eval()


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ================================================================ the mechanism, in-process
def test_atomic_directory_swaps_whole_and_failure_keeps_the_old(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst) as tmp:
        (tmp / "a.txt").write_text("old a")
        (tmp / "b.txt").write_text("old b")
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            (tmp / "a.txt").write_text("new a")
            raise RuntimeError("killed halfway")
    assert {p.name: p.read_text() for p in dst.iterdir()} == {"a.txt": "old a", "b.txt": "old b"}
    with atomic_directory(dst) as tmp:
        (tmp / "c.txt").write_text("new c")
    assert [p.name for p in dst.iterdir()] == ["c.txt"]  # the old folder is replaced, not merged
    assert _temporaries(tmp_path) == []


def test_rerun_restores_a_folder_killed_between_the_two_renames(tmp_path):
    """The one moment dst is absent: it sits complete under the .old name, and the next writer puts it back."""
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "config.json").write_text("{}")
    old = tmp_path / ".model.clipforge-abcd1234.old"
    os.rename(dst, old)  # what a kill right after the first rename leaves
    assert cleanup_stale(tmp_path) == [dst]
    assert (dst / "config.json").read_text() == "{}" and not old.exists()
    os.rename(dst, old)
    assert recover_directory(dst) == dst  # a writer of dst does the same before building


def test_replacing_a_folder_of_unrelated_files_is_refused(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(FileExistsError, match="holiday.jpg"):
        save_openclip_dir(_tiny_model(0), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["holiday.jpg"]


def test_cleanup_removes_only_our_unlocked_temporaries(tmp_path):
    ours = tmp_path / ".step_00000004.pt.clipforge-k2j4h5g6.tmp"
    ours.write_bytes(b"torn")
    folder = tmp_path / ".final.clipforge-zz99yy88.tmp"
    folder.mkdir()
    (folder / "x").write_bytes(b"half")
    theirs = [tmp_path / ".notes.txt.swp", tmp_path / ".data.abcdefgh.tmp", tmp_path / "keep.tmp"]
    for p in theirs:
        p.write_text("not clipforge's")
    busy = tmp_path / ".live.pt.clipforge-aaaabbbb.tmp"
    busy.write_bytes(b"being written")
    import fcntl

    fd = os.open(busy, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer holds its temporary's lock
    try:
        removed = cleanup_stale(tmp_path)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([ours, folder])
    assert all(p.exists() for p in theirs) and busy.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask_not_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        write_text(tmp_path / "a.json", "{}")
        save_openclip_dir(_tiny_model(0), tmp_path / "hub")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "hub").stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "hub").iterdir()} == {0o666 & ~umask}


# ================================================================ checkpoints: pruning, corruption, resume
def _state(step: int, value: float = 1.0):
    return {"step": step, "epoch": 0, "batch": step, "state_dict": {"w": torch.full((4,), value)},
            "optimizer": {"state": {}, "param_groups": []}}


def test_no_moment_has_more_than_keep_last_checkpoints(tmp_path, monkeypatch):
    """The oldest goes before the new one is renamed in: a kill between rename and prune cannot leave 3."""
    import clipforge.atomic as atomic

    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(len(list_checkpoints(tmp_path)))  # what a kill right before/after this rename would leave
        real_replace(src, dst)
        seen.append(len(list_checkpoints(tmp_path)))

    monkeypatch.setattr(atomic.os, "replace", replace)
    for step in range(1, 6):
        save_checkpoint(_state(step), tmp_path, keep_last=2)
    assert max(seen) == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004.pt", "step_00000005.pt"]


def test_start_of_run_removes_temporaries_and_extra_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(_state(step), tmp_path, keep_last=3)
    torn = tmp_path / "checkpoints" / ".step_00000004.pt.clipforge-abcdefgh.tmp"
    torn.write_bytes(b"x" * 1000)
    removed = prepare_checkpoint_dir(tmp_path, keep_last=2)  # e.g. keep_last lowered, or an old version's run
    assert removed == [torn]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]


def test_corrupt_newest_checkpoint_falls_back_and_says_why(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(_state(step, float(step)), tmp_path, keep_last=3)
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated (a disk error, a copy cut short)
    with pytest.warns(UserWarning, match="skipped .*step_00000006.pt"):
        point = find_resume("latest", tmp_path)
    assert point.path.name == "step_00000004.pt" and point.state["step"] == 4
    assert any("step_00000006.pt" in n for n in point.notes) and any("step_00000004.pt" in n for n in point.notes)
    for p in list_checkpoints(tmp_path):
        p.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        find_resume("latest", tmp_path)


def test_resume_latest_without_checkpoint_says_so_and_must_refuses(tmp_path):
    with pytest.warns(UserWarning, match="no checkpoint in .*starting a fresh run"):
        point = find_resume("latest", tmp_path)
    assert point.state is None and "fresh" in point.notes[0]
    with pytest.raises(FileNotFoundError, match="resume=must: no checkpoint in"):
        find_resume("must", tmp_path)


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    return write_caption_tsv(tmp_path_factory.mktemp("data"), n_images=16, captions_per_image=1)


def test_wrong_architecture_resume_names_file_and_shapes(tsv, tmp_path):
    from clipforge.train import TrainConfig, train

    cfg = tiny_config(tmp_path, tsv, max_steps=1)
    train(TrainConfig.from_dict(cfg))
    ckpt = list_checkpoints(tmp_path / "runs" / "run")[-1]
    state = read_training_checkpoint(ckpt)
    state["model_config"]["embed_dim"] = 48  # weights of one architecture, a record of another
    bad = tmp_path / "other.pt"
    save_torch(state, bad)
    with pytest.raises(CheckpointError, match=r"other\.pt does not fit the model: .*mis-shaped: .*text_projection"):
        train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, max_steps=2, name="b", resume=str(bad))))
    shutil.rmtree(tmp_path / "runs")
    bad.unlink()


def test_every_skipped_sample_is_listed_in_the_run_folder(tsv, tmp_path):
    from clipforge.train import TrainConfig, train

    rows = tsv.read_text().splitlines()
    broken = [f"images/missing_{i:02d}.jpg\ta missing picture" for i in range(16)]  # more than any "first few"
    data = tsv.parent / "with_broken.tsv"
    data.write_text("\n".join(rows + broken) + "\n")
    cfg = tiny_config(tmp_path, data, epochs=1, data={"max_bad_fraction": 0.9, "min_seen": 1000})
    summary = train(TrainConfig.from_dict(cfg))
    lines = [json.loads(x) for x in (tmp_path / "runs" / "run" / "skipped.jsonl").read_text().splitlines()]
    assert summary["data"]["skipped"] == 16 == len(lines)
    assert sorted(Path(r["file"]).name for r in lines) == sorted(f"missing_{i:02d}.jpg" for i in range(16))
    assert all("FileNotFoundError" in r["reason"] and r["step"] >= 1 for r in lines)
    assert "skipped.jsonl" in summary["data_summary"]
    shutil.rmtree(tmp_path / "runs" / "run" / "checkpoints")


# ================================================================ a full disk
@contextlib.contextmanager
def _small_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (needs root); None where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        proc = None
    if proc is None or proc.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


def _capped_torch_save(monkeypatch, limit: int):
    """Where no tmpfs can be mounted: torch.save that fails as a full disk does after ``limit`` bytes."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        if os.path.getsize(f) > limit:
            with open(f, "r+b") as fh:
                fh.truncate(limit)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_names_device_path_and_size_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    with _small_filesystem(tmp_path / "small", "1m") as fs:
        run = fs or tmp_path / "capped"
        save_checkpoint(_state(1), run, keep_last=1)
        big = {**_state(2), "state_dict": {"w": torch.zeros(600_000)}}  # 2.4 MB
        if fs is None:
            _capped_torch_save(monkeypatch, 500_000)
        with pytest.raises(NoSpaceError) as info:
            save_checkpoint(big, run, keep_last=1)
        monkeypatch.undo()
        message = str(info.value)
        assert "no space left on" in message and "step_00000002.pt" in message and "needed ~2.3 MB" in message
        if fs is not None:
            assert "tmpfs (mounted on" in message  # the device
        assert [p.name for p in list_checkpoints(run)] == ["step_00000001.pt"]  # keep_last=1 deleted nothing
        assert torch.equal(read_checkpoint(list_checkpoints(run)[0])["state_dict"]["w"], torch.ones(4))
        assert _temporaries(run) == []
    TALLY["full disk"]["injections"] += 1


def test_full_disk_during_convert_and_shards_keeps_previous_outputs(tmp_path):
    from clipforge.checkpoints.convert import convert
    from clipforge.data.shards import write_shards

    with _small_filesystem(tmp_path / "small", "20m") as fs:
        if fs is None:
            pytest.skip("cannot mount a tmpfs here (not root); the capped-writer test covers checkpoints")
        src_a, src_b = tmp_path / "a", tmp_path / "b"
        save_openclip_dir(_tiny_model(0, vocab_size=49408), src_a)
        save_openclip_dir(_tiny_model(1, embed_dim=48, vocab_size=49408), src_b)
        convert(src_a, fs / "hf", to="hf")  # ~13 MB: a second copy does not fit
        with pytest.raises(NoSpaceError, match=r"no space left on tmpfs .*writing .*model\.safetensors"):
            convert(src_b, fs / "hf", to="hf")
        assert _same_weights(load_any(fs / "hf")[0], _tiny_model(0, vocab_size=49408)) and _temporaries(fs) == []
        TALLY["full disk"]["injections"] += 1
        tiny, big = tmp_path / "tiny.png", tmp_path / "big.png"
        from PIL import Image  # real PNGs: write_shards decodes what it writes

        Image.new("RGB", (4, 4)).save(tiny)
        noise = torch.randint(0, 256, (1200, 1200, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        Image.fromarray(noise.numpy()).save(big)  # ~4.3 MB: noise does not compress
        write_shards([(tiny, "small")], fs / "shards")
        with pytest.raises(NoSpaceError, match="no space left on tmpfs"):
            write_shards([(big, "big one"), (big, "again")], fs / "shards")  # 8 MB: more than is left
        assert json.loads((fs / "shards" / "sizes.json").read_text()) == {"shard-000000.tar": 1}
        assert _temporaries(fs) == []
    TALLY["full disk"]["injections"] += 1


# ================================================================ SIGKILL at chosen and random moments
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hook_target(name: str):
    import shutil

    import safetensors.torch

    return {"torch.save": (torch, "save"), "save_file": (safetensors.torch, "save_file"),
            "os.replace": (os, "replace"), "os.rename": (os, "rename"), "rmtree": (shutil, "rmtree"),
            "tar_add": (tarfile.TarFile, "addfile"), "optim_step": (torch.optim.AdamW, "step")}[name]


def arm(hook: dict) -> None:
    """SIGKILL this process at the ``n``-th call of ``target``: before it, after it, or after tearing its file."""
    owner, attr = _hook_target(hook["target"])
    real, calls = getattr(owner, attr), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != hook["n"]:
            return real(*args, **kwargs)
        if hook["when"] == "before":
            _die()
        out = real(*args, **kwargs)
        if hook["when"] == "torn":  # the file argument, cut in half: a kill in the middle of the write
            file = args[1]
            with open(file, "r+b") as f:
                f.truncate(os.path.getsize(file) // 2)
        _die()
        return out

    setattr(owner, attr, wrapper)


def run_job(job: dict) -> None:
    """One job in a forked child of the zygote (also the place to add embed/export jobs)."""
    if job.get("hook"):
        arm(job["hook"])
    kind = job["kind"]
    if kind == "train":
        from clipforge.train import TrainConfig, train

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(TrainConfig.from_dict(job["config"]))
    elif kind == "convert":
        from clipforge.checkpoints.convert import convert

        convert(job["src"], job["dst"], to=job["to"])
    elif kind == "hub":
        model, pp = load_any(job["src"])
        save_openclip_dir(model, job["dst"], pp)
    elif kind == "shards":
        from clipforge.data.shards import write_shards

        write_shards([tuple(r) for r in job["records"]], job["dst"], max_count_per_shard=job["per_shard"])
    else:
        raise ValueError(f"unknown job kind {kind!r}")


class Zygote:
    """A subprocess that has imported torch and clipforge; each job runs in a fresh fork of it."""

    def __init__(self, log_dir: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), "--zygote", str(log_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=TESTS)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.log_dir = log_dir

    def run(self, job: dict, kill_after: float | None = None) -> dict:
        """Run ``job``; returns {"rc": exit code or None, "signal": signal number or None, "log": text}."""
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if kill_after is not None:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        result = json.loads(self.proc.stdout.readline())
        result["log"] = Path(result["log"]).read_text()[-3000:]
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _zygote_main(log_dir: str) -> None:
    import clipforge.checkpoints.convert  # noqa: F401  (imported once, before any fork)
    import clipforge.data.shards  # noqa: F401
    import clipforge.train  # noqa: F401
    import safetensors.torch  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for i, line in enumerate(sys.stdin):
        job = json.loads(line)
        log = Path(log_dir) / f"job_{i:03d}.log"
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                run_job(job)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                          "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "log": str(log)}), flush=True)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("fault_logs"))
    yield z
    z.close()


def _killed(result: dict) -> bool:
    if result["signal"] == signal.SIGKILL:
        return True
    assert result["rc"] == 0, result["log"]  # not killed: it must then have succeeded
    return False


def _train_invariants(run: Path, keep_last: int) -> bool:
    """What must hold after any kill: at most keep_last checkpoints, the newest loads, final/ complete if present.

    Temporaries are left for the next run to clean (the final check sees none left).
    """
    found = list_checkpoints(run)
    ok = len(found) <= keep_last
    if found:
        try:
            read_training_checkpoint(found[-1])
        except Exception:
            ok = False
    if (run / "final").exists():
        try:
            load_openclip_dir(run / "final")
        except Exception:
            ok = False
    return ok


def test_sigkill_during_training_and_checkpoint_writes_then_resume_is_bit_identical(zygote, tsv, tmp_path):
    rng = random.Random(13)
    common = dict(epochs=2, save_every_n_steps=2, keep_last=2, threads=1, workers=0, batch_size=4,
                  model={"patch_dropout": 0.25}, aug={"scale": [0.5, 1.0]})  # randomness that must be restored
    began = time.perf_counter()
    ref = zygote.run({"kind": "train", "config": tiny_config(tmp_path, tsv, name="reference", **common)})
    assert not _killed(ref)
    run_seconds = time.perf_counter() - began
    run_cfg = tiny_config(tmp_path, tsv, name="killed", resume="latest", **common)
    run = tmp_path / "runs" / "killed"
    # 8 steps, a checkpoint every 2 (4 torch.save calls), the final model. Each kill hits a fresh resumed child.
    injections = [
        {"target": "torch.save", "n": 2, "when": "torn"},  # mid-write of a checkpoint
        {"target": "os.replace", "n": rng.randint(2, 4), "when": "after"},  # right after a rename, before pruning
        {"target": "optim_step", "n": rng.randint(2, 5), "when": "before"},  # between checkpoints
        {"target": "torch.save", "n": 1, "when": "before"},
        None,  # a kill after a random delay, wherever it lands (if the run ends first, the next points hit its rerun)
        {"target": "save_file", "n": 1, "when": "torn"},  # the final model's weights, mid-write
        {"target": "os.rename", "n": 1, "when": "after"},  # final/ renamed in, summary.json not yet written
    ]
    outcomes = []
    for hook in injections:
        result = zygote.run({"kind": "train", "config": run_cfg, "hook": hook},
                            kill_after=None if hook else rng.uniform(0.2, 0.9) * run_seconds)
        if not _killed(result):
            outcomes.append((hook, "finished first"))
            continue
        TALLY["train: SIGKILL"]["injections"] += 1
        intact = _train_invariants(run, keep_last=2)
        TALLY["train: SIGKILL"]["lost"] += not intact
        outcomes.append((hook, "intact" if intact else "LOST"))
    kills = sum(o != "finished first" for _, o in outcomes)
    assert kills >= 5 and all(o != "LOST" for _, o in outcomes), outcomes
    final = zygote.run({"kind": "train", "config": run_cfg})
    assert not _killed(final)
    a = read_checkpoint(tmp_path / "runs" / "reference" / "final" / "open_clip_model.safetensors")
    b = read_checkpoint(run / "final" / "open_clip_model.safetensors")
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not identical:
        TALLY["train: SIGKILL"]["lost"] += 1
    assert identical, "resumed weights differ from the uninterrupted run"
    assert len(list_checkpoints(run)) <= 2 and _temporaries(run) == []
    steps = json.loads((tmp_path / "runs" / "reference" / "summary.json").read_text())["steps"]
    assert json.loads((run / "summary.json").read_text())["steps"] == steps == 8
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, steps + 1))  # none lost or repeated
    shutil.rmtree(tmp_path / "runs")  # ~200 MB of checkpoints


# Points inside a folder write: a weight file torn mid-write, after the k-th file rename inside the
# temporary folder, right after the first swap rename (dst moved aside: the only moment dst is absent),
# after the second (new folder in place, old not yet deleted), and as the old folder is deleted.
_FOLDER_POINTS = [{"target": "save_file", "n": 1, "when": "torn"},
                  {"target": "os.replace", "n": 1, "when": "after"},  # new weights in, the config not yet
                  {"target": "os.replace", "n": None, "when": "after"},
                  {"target": "os.rename", "n": 1, "when": "after"},
                  {"target": "os.rename", "n": 2, "when": "after"},
                  {"target": "rmtree", "n": 1, "when": "before"}]


def _weights_of(path: Path):
    model, _ = load_any(path)
    return tuple((k, v.sum().item()) for k, v in sorted(model.state_dict().items()))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_openclip_dir(_tiny_model(0), root / "a")
    save_openclip_dir(_tiny_model(1, embed_dim=48), root / "b")  # another architecture: a mix cannot load
    return root / "a", root / "b"


def test_kill_during_convert_leaves_old_or_new_never_a_mix(zygote, two_models, tmp_path):
    from clipforge.checkpoints.convert import convert

    src_a, src_b = two_models
    rng = random.Random(5)
    dst = tmp_path / "out" / "hf"
    convert(src_a, dst, to="hf")
    old, new = _weights_of(src_a), _weights_of(src_b)
    job = {"kind": "convert", "src": str(src_b), "dst": str(dst), "to": "hf"}
    for point in _FOLDER_POINTS:
        hook = dict(point, n=point["n"] or rng.randint(2, 6))
        assert _killed(zygote.run({**job, "hook": hook}))
        TALLY["convert: SIGKILL"]["injections"] += 1
        cleanup_stale(dst.parent)
        try:
            got = _weights_of(dst)
        except Exception:
            got = None
        if got not in (old, new):
            TALLY["convert: SIGKILL"]["lost"] += 1
        assert got in (old, new), f"after a kill at {hook}, {dst} is neither the old model nor the new one"
        if got == new:  # put the old output back, so the next kill has something to lose
            convert(src_a, dst, to="hf")
    # A single-file destination: torn mid-write, the old file stays.
    file_dst = tmp_path / "out" / "model.pt"
    convert(src_a, file_dst, to="open_clip")
    assert _killed(zygote.run({"kind": "convert", "src": str(src_b), "dst": str(file_dst), "to": "open_clip",
                               "hook": {"target": "torch.save", "n": 1, "when": "torn"}}))
    TALLY["convert: SIGKILL"]["injections"] += 1
    cleanup_stale(file_dst.parent)
    ok = read_checkpoint(file_dst).keys() == _tiny_model(0).state_dict().keys()
    TALLY["convert: SIGKILL"]["lost"] += not ok
    assert ok
    assert not _killed(zygote.run(job))  # reruns succeed
    assert _weights_of(dst) == new and _temporaries(tmp_path / "out") == []


def test_convert_and_shards_remove_what_a_killed_run_left(two_models, tsv, tmp_path):
    from clipforge.checkpoints.convert import convert
    from clipforge.data.shards import write_shards

    stale = [tmp_path / ".hf.clipforge-abcdefgh.tmp", tmp_path / ".model.pt.clipforge-12345678.tmp",
             tmp_path / ".shards.clipforge-a1b2c3d4.tmp"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(bytes(1000))
    stale[1].write_bytes(bytes(1000))
    convert(two_models[0], tmp_path / "hf", to="hf")
    assert not any(p.exists() for p in stale[:2])
    stale[2].mkdir()
    write_shards([(str(tsv.parent / "images" / "000.jpg"), "a caption")], tmp_path / "shards")
    assert not stale[2].exists() and _temporaries(tmp_path) == []


def test_kill_during_hub_folder_write_leaves_old_or_new(zygote, two_models, tmp_path):
    src_a, src_b = two_models
    rng = random.Random(7)
    dst = tmp_path / "hub"
    save_openclip_dir(_tiny_model(0), dst)
    old, new = _weights_of(src_a), _weights_of(src_b)
    for point in _FOLDER_POINTS:
        hook = dict(point, n=point["n"] or rng.randint(2, 6))
        assert _killed(zygote.run({"kind": "hub", "src": str(src_b), "dst": str(dst), "hook": hook}))
        TALLY["hub folder: SIGKILL"]["injections"] += 1
        cleanup_stale(dst.parent)
        try:
            got = _weights_of(dst)
        except Exception:
            got = None
        TALLY["hub folder: SIGKILL"]["lost"] += got not in (old, new)
        assert got in (old, new), f"after a kill at {hook}, {dst} is neither the old folder nor the new one"
        if got == new:
            save_openclip_dir(_tiny_model(0), dst)
    assert not _killed(zygote.run({"kind": "hub", "src": str(src_b), "dst": str(dst)}))
    assert _weights_of(dst) == new and _temporaries(tmp_path) == []


def _read_shard_set(folder: Path):
    """(sizes.json, every (key, caption) in the tars) of a shard folder; raises when they disagree."""
    sizes = json.loads((folder / "sizes.json").read_text())
    tars = sorted(p.name for p in folder.glob("*.tar"))
    assert tars == sorted(sizes), (tars, sizes)
    samples = []
    for name in tars:
        with tarfile.open(folder / name) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".txt")]
            assert len(members) == sizes[name]
            samples += [(m.name, tar.extractfile(m).read().decode()) for m in members]
    return samples


def test_kill_during_shard_writing_leaves_old_or_new_set(zygote, tsv, tmp_path):
    from clipforge.data.captions import read_caption_file
    from clipforge.data.shards import write_shards

    records = [(str(r.path), r.caption) for r in read_caption_file(tsv)]
    old_records, new_records = records[:6], [(p, c + " (new)") for p, c in records]
    dst = tmp_path / "shards"
    write_shards(old_records, dst, max_count_per_shard=2)
    write_shards(new_records, tmp_path / "expected", max_count_per_shard=3)
    old, new = _read_shard_set(dst), _read_shard_set(tmp_path / "expected")
    rng = random.Random(11)
    job = {"kind": "shards", "records": new_records, "dst": str(dst), "per_shard": 3}
    points = [{"target": "tar_add", "n": rng.randint(2, 30), "when": "before"},
              {"target": "tar_add", "n": rng.randint(2, 30), "when": "after"},
              {"target": "os.replace", "n": 1, "when": "after"},  # sizes.json in place inside the temporary
              {"target": "os.rename", "n": 1, "when": "after"},  # the old set moved aside
              {"target": "os.rename", "n": 2, "when": "after"}]  # the new set in, the old not yet deleted
    for hook in points:
        assert _killed(zygote.run({**job, "hook": hook}))
        TALLY["shards: SIGKILL"]["injections"] += 1
        cleanup_stale(tmp_path)
        try:
            got = _read_shard_set(dst)
        except Exception:
            got = None
        TALLY["shards: SIGKILL"]["lost"] += got not in (old, new)
        assert got in (old, new), f"after a kill at {hook} the shard set is neither the old nor the new one"
        if got == new:
            write_shards(old_records, dst, max_count_per_shard=2)
    assert not _killed(zygote.run(job))
    assert _read_shard_set(dst) == new and _temporaries(tmp_path) == []


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    sys.path.insert(0, str(TESTS))
    _zygote_main(sys.argv[2])

"""Resume after SIGKILL / SIGTERM, atomic checkpoints, teacher hash, run-dir ownership.

One scenario with the real ``atx-train`` in subprocesses (module fixture), tiny AT run of 2
epochs x 6 steps with a step checkpoint every 2 steps:

- reference: uninterrupted, as a 1-job sweep (``-m`` with a pinned sweep dir), run at the same
  time as the interrupted run's resumes;
- interrupted: SIGKILL once ``step-2.ckpt`` exists (mid-epoch 0) -> ``resume=<dir>`` -> SIGTERM
  once ``step-8.ckpt`` exists (mid-epoch 1) -> the two newest checkpoints truncated -> resume
  again from the epoch-0 end checkpoint to the end.

The interrupted run must end with exactly the reference's weights (deterministic mode).
A claim on a copy of the killed run checks that the teacher is judged by its file's hash
(moved: accepted, rewritten in place: refused). The lock, pruning and training on past a
finished run are in ``test_run_dir.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from configs import compose_cfg
from run_dirs import release_locks
from wandb_records import read_records, summarise

from atx.data.sampler import ResumableRandomSampler
from atx.errors import AtxError
from atx.models import build_model
from atx.resume import AtomicCheckpointIO, newest_checkpoint
from atx.run_dir import claim_run_dir

ROOT = Path(__file__).parents[1]
RUN = [
    "model.depth=10",
    "distill=at",
    "teacher=wrn_16_2",
    "teacher.depth=10",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "data.train_subset=48",  # 6 steps per epoch
    "data.val_subset=16",
    "data.batch_size=8",
    "checkpoint.every_n_steps=2",
    "optim.recipe=authors",  # lr drop and momentum restart at the start of epoch 2, resumed
    "optim.milestones=[2]",
    "figure_images=0",
    "logger=csv",
]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "atx.train", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def signal_at(proc: subprocess.Popen[str], file: Path, sig: int) -> None:
    """Send ``sig`` as soon as ``file`` exists (checkpoints appear whole: atomic rename)."""
    deadline = time.monotonic() + 240
    while not file.exists():
        assert proc.poll() is None, f"run ended before {file.name}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {file.name}"
        time.sleep(0.02)
    os.kill(proc.pid, sig)


def student(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "student.pt", weights_only=True)


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    model = build_model("wrn", num_classes=10, in_channels=1, depth=10, width=2)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_pt) -> dict:
    base = tmp_path_factory.mktemp("runs")
    args = [*RUN, f"teacher.checkpoint={teacher_pt}"]
    out: dict = {"args": args, "sweep": base / "sweep", "run": base / "run"}
    run = out["run"]
    killed = start([*args, f"hydra.run.dir={run}"])
    signal_at(killed, run / "checkpoints" / "step-2.ckpt", signal.SIGKILL)
    out["killed"] = finish(killed)
    out["teacher_checks"] = _teacher_checks(run, args, teacher_pt)  # teacher_pt restored after

    # the uninterrupted reference runs beside the rest (its own dir; the teacher file is final)
    reference = start(["-m", *args, f"hydra.sweep.dir={out['sweep']}"])
    wandb = {"WANDB_MODE": "offline"}
    terminated = start([f"resume={run}", "logger=wandb"], env=wandb)
    signal_at(terminated, run / "checkpoints" / "step-8.ckpt", signal.SIGTERM)
    out["terminated"] = finish(terminated)
    out["interrupted_exists"] = (run / "checkpoints" / "interrupted.ckpt").is_file()

    for name in ("interrupted.ckpt", "step-8.ckpt"):  # a crash while writing, twice over
        ckpt = run / "checkpoints" / name
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    (run / "checkpoints" / ".last.ckpt.tmp999").write_bytes(b"PK")  # a writer killed mid-write
    out["resumed"] = finish(start([f"resume={run}", "logger=wandb"], env=wandb))
    out["reference"] = finish(reference)
    job = out["sweep"] / "0"
    out["stamps"] = [(job / f).stat().st_mtime_ns for f in ("student.pt", "metrics.json")]
    out["relaunched"] = finish(start(["-m", *args, f"hydra.sweep.dir={out['sweep']}"]))
    return out


def _claim(args: list[str], run: Path) -> str:
    """In process, the claim alone: the checkpoint it would resume from, or the refusal."""
    try:
        claim = claim_run_dir(compose_cfg([*args, f"resume={run}"]), run)
        return f"resumes from {claim.checkpoint.name}" if claim.checkpoint else "from scratch"
    except AtxError as e:
        return f"refused: {e}"
    finally:
        release_locks()


def _teacher_checks(run: Path, args: list[str], teacher_pt: Path) -> dict[str, str]:
    """Resume claims on a copy of the killed run (its checkpoint recorded ``teacher_pt``) with
    the same bytes at another path, then with other bytes at the same path; ``teacher_pt`` is
    put back before anything else reads it."""
    copy = run.with_name("teacher_checks")
    shutil.copytree(run, copy)
    moved = teacher_pt.with_name("moved.pt")
    shutil.copyfile(teacher_pt, moved)
    out = {"moved": _claim([*args, f"teacher.checkpoint={moved}"], copy)}
    original = teacher_pt.read_bytes()
    state = torch.load(teacher_pt, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, teacher_pt)
    try:
        out["rewritten_sha256"] = hashlib.sha256(teacher_pt.read_bytes()).hexdigest()
        out["rewritten"] = _claim(args, copy)
    finally:
        teacher_pt.write_bytes(original)
    return out


def test_sigkill_sigterm_and_corrupt_checkpoints_resume_to_the_same_weights(runs):
    rc, err = runs["reference"]
    assert rc == 0, err[-3000:]
    assert runs["killed"][0] == -signal.SIGKILL
    rc, err = runs["terminated"]
    assert rc == 143, err[-3000:]
    assert runs["interrupted_exists"]
    last = err.strip().splitlines()[-1]
    assert last.startswith("atx: error: interrupted by SIGTERM at step ")
    assert last.endswith(f"resume with: atx-train resume={runs['run']}")
    assert "resuming" in err and "step-2.ckpt" in err  # SIGKILL lost at most 2 steps
    rc, err = runs["resumed"]
    assert rc == 0, err[-3000:]
    assert "skipping unreadable checkpoint" in err and "interrupted.ckpt" in err
    assert "ckpt (epoch 0, step 6)" in err  # the epoch-end one: last or best
    assert not list((runs["run"] / "checkpoints").glob(".*.tmp*"))

    reference, resumed = student(runs["sweep"] / "0"), student(runs["run"])
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    ref_metrics = json.loads((runs["sweep"] / "0" / "metrics.json").read_text())
    metrics = json.loads((runs["run"] / "metrics.json").read_text())
    assert metrics["val/error"] == ref_metrics["val/error"]
    assert metrics["epochs"] == 2
    # pruned to checkpoint.keep_last (default 2) across both resumes; step-2 is the file the
    # SIGTERM-ed launch resumed from, which Lightning never deletes
    assert sorted(p.name for p in (runs["run"] / "checkpoints").glob("step-*.ckpt")) == [
        "step-10.ckpt", "step-12.ckpt", "step-2.ckpt"]


def epoch_metrics(run: Path) -> dict[int, dict[str, float]]:
    """The epoch values of ``train/*`` of each epoch in ``csv/metrics.csv``."""
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return {int(float(r["epoch"])): {k: float(v) for k, v in r.items() if is_epoch_value(k) and v}
            for r in rows if r.get("train/loss_epoch")}


def is_epoch_value(key: str) -> bool:
    return key.startswith("train/") and (key.endswith("_epoch") or key == "train/error")


def wandb_epoch_metrics(path: Path) -> dict[int, dict[str, float]]:
    """The same from an offline W&B run file (history rows)."""
    out: dict[int, dict[str, float]] = {}
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in rec.history.item}
            if "train/loss_epoch" in row:
                out[int(row["epoch"])] = {k: v for k, v in row.items() if is_epoch_value(k)}
    return out


def test_a_mid_epoch_resume_logs_the_whole_epochs_metrics(runs):
    """Epoch 0 was resumed after its step 2 (by the launch SIGTERM stopped in epoch 1) and
    epoch 1 after the epoch-0 end: the epoch values average all 6 steps of each epoch, as in
    the uninterrupted run."""
    reference = epoch_metrics(runs["sweep"] / "0")
    first, _ = sorted(runs["run"].glob("wandb/offline-run-*/run-*.wandb"))
    resumed = {0: wandb_epoch_metrics(first)[0], 1: epoch_metrics(runs["run"])[1]}
    assert {"train/loss_epoch", "train/error", "train/at/group1_epoch"} <= set(reference[0])
    for epoch in (0, 1):
        assert resumed[epoch] == pytest.approx(reference[epoch], rel=1e-6), epoch


def test_resumed_runs_continue_one_wandb_run(runs):
    run = runs["run"]
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the SIGTERM-ed launch and the final one
    ids = {summarise(f)["id"] for f in files}
    assert ids == {(run / "wandb_id.txt").read_text().strip()}


def test_the_teacher_is_judged_by_its_contents_not_its_path(runs, teacher_pt):
    checks = runs["teacher_checks"]
    assert checks["moved"].startswith("resumes from ") and checks["moved"].endswith(".ckpt")
    message = checks["rewritten"]
    original = hashlib.sha256(teacher_pt.read_bytes()).hexdigest()
    assert message.startswith(
        f"refused: teacher.checkpoint '{teacher_pt.resolve()}' (sha256"
        f" {checks['rewritten_sha256'][:12]}) is not the teacher checkpoint"
    )
    assert f"'{teacher_pt.resolve()}', sha256 {original[:12]}): give that teacher file" in message


def test_checkpoints_are_student_sized_with_teacher_identity(runs, teacher_pt):
    ckpt_path = runs["sweep"] / "0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    student_bytes = (runs["sweep"] / "0" / "student.pt").stat().st_size
    teacher_bytes = teacher_pt.stat().st_size
    # weights + SGD momentum + loop state: well under what a teacher copy would add
    assert ckpt_path.stat().st_size < 2 * student_bytes + teacher_bytes // 2
    assert ckpt["atx"]["teacher"]["path"] == str(teacher_pt.resolve())
    assert ckpt["atx"]["teacher"]["sha256"] == hashlib.sha256(teacher_pt.read_bytes()).hexdigest()


def test_finished_sweep_job_is_skipped_not_overwritten(runs):
    rc, err = runs["relaunched"]
    assert rc == 0, err[-3000:]
    assert "has finished already: skipped" in err
    job = runs["sweep"] / "0"
    assert [(job / f).stat().st_mtime_ns for f in ("student.pt", "metrics.json")] == runs["stamps"]


def test_another_config_in_a_used_dir_is_refused_and_its_hydra_files_kept(runs):
    job = runs["sweep"] / "0"
    original = (job / ".hydra" / "config.yaml").read_text()
    (job / ".hydra" / "config.yaml").write_text("seed: 1\n")  # as Hydra rewrites it
    cfg = compose_cfg([*runs["args"], "seed=1"])
    with pytest.raises(AtxError, match=r"belongs to another run \(seed=0 there, 1 here\)"):
        claim_run_dir(cfg, job)
    assert (job / ".hydra" / "config.yaml").read_text() == original


def test_resume_refuses_a_changed_config(runs):
    cfg = compose_cfg([*runs["args"], "distill.at.beta=5", f"resume={runs['run']}"])
    with pytest.raises(AtxError, match=r"distill\.at\.beta=5\.0 differs from the run's"):
        claim_run_dir(cfg, runs["run"])


def test_sampler_matches_random_sampler_and_resumes_mid_epoch():
    data = list(range(50))
    torch.manual_seed(3)
    expected = list(torch.utils.data.RandomSampler(data))
    torch.manual_seed(3)
    sampler = ResumableRandomSampler(data)
    assert list(sampler) == expected
    sampler.resume_point = (sampler.epoch_seed, 20)
    assert list(sampler) == expected[20:]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "loops": {}}, path)

    def crash(obj, f):  # dies half-way through writing
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr("atx.resume.torch.save", crash)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "loops": {}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left
    found = newest_checkpoint_in(tmp_path)
    assert torch.equal(found["state_dict"]["w"], torch.ones(3))


def newest_checkpoint_in(folder: Path) -> dict:
    run = folder / "run"
    (run / "checkpoints").mkdir(parents=True)
    for p in folder.glob("*.ckpt"):
        p.rename(run / "checkpoints" / p.name)
    found = newest_checkpoint(run)
    assert found is not None
    return found[1]


PREEMPTED = """
import signal, sys
from pathlib import Path

run = Path(sys.argv[1])


def requeue(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
    saved = (run / "checkpoints" / "interrupted.ckpt").is_file()
    (run / "requeued").write_text(f"{signal.Signals(signum).name} saved={saved}")
    sys.exit(3)


signal.signal(signal.SIGUSR2, requeue)
sys.argv = ["atx-train", *sys.argv[2:]]
from atx.train import main

main()
"""


def test_launcher_preemption_signal_saves_first_then_requeues(runs, tmp_path):
    """Slurm/submitit preemption (USR2 to a process whose launcher handles it): the step ends,
    interrupted.ckpt is written, then the launcher's handler runs; the requeued job resumes
    to the uninterrupted weights."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", PREEMPTED, str(run), *runs["args"],
                             f"hydra.run.dir={run}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    signal_at(proc, run / "checkpoints" / "step-2.ckpt", signal.SIGUSR2)
    code, err = finish(proc)
    assert code == 3, err[-2000:]
    assert (run / "requeued").read_text() == "SIGUSR2 saved=True"
    saved = torch.load(run / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert saved["global_step"] >= 2
    code, err = finish(start([f"resume={run}"]))  # the requeued job
    assert code == 0, err[-2000:]
    reference = torch.load(runs["sweep"] / "0" / "student.pt", weights_only=True)
    assert all(torch.equal(v, student(run)[k]) for k, v in reference.items())

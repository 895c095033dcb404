"""Who owns a run dir (``atx.run_dir``): the lock against a second live process, pruning of
step checkpoints, starting over when no checkpoint can be read, refusals, resume's argv.

Everything here runs in the test process or in one small helper process; the full
kill-and-resume scenario with the real ``atx-train`` is ``test_resume.py``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from configs import compose_cfg
from run_dirs import release_locks

from atx.errors import AtxError
from atx.run_dir import claim_run_dir, differences, expand_resume_argv
from atx.train import train

TESTS = Path(__file__).parent
TINY = ["model.depth=10", "trainer.max_epochs=1", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.num_sanity_val_steps=0", "logger=csv", "figure_images=0"]

# takes the run dir as a run does (claim_run_dir), says so, and holds it until killed
HOLDER = """
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from configs import compose_cfg
from atx.run_dir import claim_run_dir

claim_run_dir(compose_cfg(sys.argv[3:]), Path(sys.argv[2]))
print("claimed", flush=True)
sys.stdin.read()
"""


def test_a_second_live_process_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(TESTS), str(run), *TINY],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline() == "claimed\n"
        lock = run / ".atx" / "lock"
        cfg = compose_cfg(TINY)
        with pytest.raises(AtxError) as refused:  # this test's process is the second one
            claim_run_dir(cfg, run)
        assert str(refused.value) == (
            f"run dir '{run}' is in use by another atx-train (pid {holder.pid}); wait for it or"
            " pick another hydra.run.dir"
        )
        assert lock.read_text() == str(holder.pid)  # the refused process left it alone
    finally:
        holder.kill()  # dies without releasing anything itself
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    try:
        claim_run_dir(cfg, run)  # the dead process's lock is gone with it
        assert lock.read_text() == str(os.getpid())
    finally:
        release_locks()


def test_only_the_newest_keep_last_step_checkpoints_are_kept(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "data.train_subset=32", "data.val_subset=8", "data.batch_size=4",
                       "checkpoint.every_n_steps=1", "checkpoint.keep_last=3"])
    train(cfg, tmp_path)  # 8 steps, a step checkpoint after each
    kept = {p.name: torch.load(p, weights_only=True)["global_step"]
            for p in (tmp_path / "checkpoints").glob("step-*.ckpt")}
    assert kept == {"step-6.ckpt": 6, "step-7.ckpt": 7, "step-8.ckpt": 8}


def test_last_ckpt_is_the_last_epoch_also_when_it_did_not_improve(tmp_path: Path) -> None:
    """A resume starts from the newest checkpoint, so ``last.ckpt`` must be rewritten at every
    epoch end. Here the student cannot change (lr 1e-30, batch norm frozen), so epoch 1 has
    epoch 0's val/error and no ``best-epoch1.ckpt`` is written."""
    cfg = compose_cfg([*TINY, "trainer.max_epochs=2", "data.train_subset=16", "data.val_subset=8",
                       "data.batch_size=8", "optim.lr=1e-30", "finetune.freeze_bn=true",
                       "checkpoint.every_n_steps=0"])
    train(cfg, tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert names == ["best-epoch0.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 4)


def epoch_rows(run: Path, key: str) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r.get(key)]


def test_a_finished_run_resumed_with_more_epochs_trains_only_the_new_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``resume=<run> trainer.max_epochs=3`` after 2 epochs (the recorded overrides plus the new
    max_epochs, as ``expand_resume_argv`` makes them): epoch 2 is trained from the epoch-1
    checkpoint. Each launch starts its own csv/metrics.csv, so epoch 2 alone there means
    epochs 0 and 1 were not trained again."""
    args = [*TINY, "data.train_subset=16", "data.val_subset=8", "data.batch_size=8",
            "checkpoint.every_n_steps=0"]
    try:
        train(compose_cfg([*args, "trainer.max_epochs=2"]), tmp_path, claim=True)
        release_locks()  # that run's process ended
        finished = torch.load(tmp_path / "student.pt", weights_only=True)
        capsys.readouterr()
        cfg = compose_cfg([*args, "trainer.max_epochs=3", f"resume={tmp_path}"])
        train(cfg, tmp_path, claim=True)
    finally:
        release_locks()
    err = capsys.readouterr().err
    assert f"atx: resuming '{tmp_path}' from " in err and "(epoch 1, step 4)" in err, err[-2000:]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert [int(float(r["epoch"])) for r in epoch_rows(tmp_path, "train/loss_epoch")] == [2]
    val = epoch_rows(tmp_path, "val/error")
    assert [int(float(r["epoch"])) for r in val] == [2]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["val/error"] == float(val[0]["val/error"])
    student = torch.load(tmp_path / "student.pt", weights_only=True)
    assert not all(torch.equal(v, student[k]) for k, v in finished.items())


def test_no_readable_checkpoint_starts_over_and_keeps_the_bad_files(tmp_path, capsys):
    """Every checkpoint unreadable: one line says the run starts from scratch; the bad files
    are kept in checkpoints/unreadable/, and Lightning writes last.ckpt, not last-v1.ckpt."""
    cfg = compose_cfg(["model.depth=10", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                       "data.train_subset=16", "data.val_subset=8", "logger=csv",
                       "figure_images=0"])
    claim_run_dir(cfg, tmp_path)  # the run started ...
    release_locks()  # ... and its process died
    bad = {"last.ckpt": b"PK\x03\x04 torn", "step-2.ckpt": b"\x00" * 64}
    (tmp_path / "checkpoints").mkdir()
    for name, content in bad.items():
        (tmp_path / "checkpoints" / name).write_bytes(content)
    capsys.readouterr()
    train(cfg, tmp_path, claim=True)
    err = capsys.readouterr().err.splitlines()
    start = f"atx: no readable checkpoint in '{tmp_path / 'checkpoints'}': starting from scratch"
    assert start in err
    assert sum("skipping unreadable checkpoint" in line and "; moved to '" in line
               for line in err) == 2
    names = {p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in names and not [n for n in names if "-v" in n], names
    aside = tmp_path / "checkpoints" / "unreadable"
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == bad
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    release_locks()


def test_dir_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(AtxError, match="already holds files not written by an atx run"):
        claim_run_dir(compose_cfg(["logger=csv"]), tmp_path)


def test_resume_argv_takes_the_runs_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("ATX_RESUME_EXPANDED", "")  # recorded, so it is unset again afterwards
    monkeypatch.delenv("ATX_RESUME_EXPANDED")
    (tmp_path / ".atx" / ".hydra").mkdir(parents=True)
    (tmp_path / ".atx" / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["model.depth=10", "trainer.max_epochs=2", f"resume={tmp_path}"])
    )
    argv = expand_resume_argv([f"resume={tmp_path}", "trainer.max_epochs=5"])
    assert argv == ["model.depth=10", "trainer.max_epochs=5", f"resume={tmp_path.resolve()}",
                    f"hydra.run.dir={tmp_path.resolve()}"]
    assert expand_resume_argv(argv) == argv  # DDP ranks re-run the expanded command line
    monkeypatch.delenv("ATX_RESUME_EXPANDED")
    with pytest.raises(SystemExit):
        expand_resume_argv([f"resume={tmp_path / 'nothing'}"])


def test_config_of_an_older_atx_resumes_with_new_keys_at_their_defaults() -> None:
    old = {"optim": {"lr": 0.1}, "data": {"root": "a"}}
    new = {"optim": {"lr": 0.1, "recipe": "standard"}, "data": {"root": "a", "val_split": 0}}
    assert differences(old, new) == []
    assert differences(old, {**new, "optim": {"lr": 0.2, "recipe": "standard"}}) == [
        ("optim.lr", 0.1, 0.2)
    ]

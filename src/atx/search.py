"""Optuna searches through Hydra (``+hparams_search=<preset>``, conf/hparams_search/): what
hydra-optuna-sweeper leaves out, as a Hydra callback (``hydra.callbacks.atx_search``). A Hydra
callback, not a sweeper subclass: Hydra finds sweepers only in the ``hydra_plugins`` namespace,
which editable installs do not expose reliably, while callbacks are plain ``_target_`` classes.

Before the sweeper starts (:meth:`SearchCallback.on_multirun_start`):

- start-up checks, each one ``atx: error:`` line and exit 2: the objective exists (atx-train
  returns the held-out error, so ``data.val_split > 0``) and is minimised, every value range
  holds values, the study was not started with other settings, and no other process is
  searching the same SQLite study now;
- a killed search resumes: ``hydra.sweeper.n_trials`` is the size of the whole study, so the
  same command again runs only the trials still missing, with TPE fitted to every finished one;
  trials a killed launch left running are marked failed and their parameters run first. Each
  launch writes its trials into a folder of its own (``hydra.sweep.subdir``: start time / job
  number), so no trial dir of an earlier launch is reused.

After each trial (:meth:`SearchCallback.on_job_end`, in the trial's own process, rank 0): its
test error and run dir are recorded beside its objective, as user attributes of the trial.
After the launch: ``trials.csv`` in the sweep dir lists every trial of the study.

Not possible through the sweeper (docs/search.md): pruning from per-epoch held-out errors (it
asks and tells whole trials; a trial's process never holds its optuna ``Trial``).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import IO, Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from atx.errors import AtxError, reason
from atx.files import try_lock
from atx.loggers import UNGROUPED, config_key
from atx.run_dir import is_rank_zero

SQLITE = "sqlite:///"
CONFIG_ATTR = "atx.config_key"  # the study's settings (all but the searched keys), first launch
_held: list[IO[str]] = []  # this launch's study lock (module level: callbacks get pickled)


def sqlite_path(storage: Any) -> Path | None:
    """The database file of a ``sqlite:///<path>`` storage URL (None for other storages)."""
    text = str(storage or "")
    return Path(text[len(SQLITE):]) if text.startswith(SQLITE) else None


def search_space(config: DictConfig) -> dict[str, Any]:
    """``{key: optuna distribution}`` of ``hydra.sweeper.params`` and the sweep overrides of the
    command line; an empty or invalid value range is an :class:`AtxError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    params = config.hydra.sweeper.get("params") or {}
    given = [f"{k}={v}" for k, v in params.items()]
    task = [str(o) for o in config.hydra.overrides.task]  # the sweeper's order: these win
    space, fixed = {}, set()
    for i, override in enumerate(OverridesParser.create().parse_overrides([*given, *task])):
        key, value = override.get_key_element(), override.value()
        if not override.is_sweep_override():
            fixed.add(key)
            continue
        where = f"hydra.sweeper.params.{key}" if i < len(given) else key
        if isinstance(value, IntervalSweep) and value.start >= value.end:
            holds = "is empty" if value.start > value.end else "holds one value"
            raise AtxError(f"{where}: interval({value.start}, {value.end}) {holds}: "
                           "give low < high")
        if not override.is_interval_sweep() and not list(override.sweep_iterator()):
            text = override.input_line.split("=", 1)[1] if override.input_line else ""
            raise AtxError(f"{where}: {text} holds no values")
        try:
            space[key] = create_optuna_distribution_from_override(override)
        except (ValueError, TypeError, AssertionError) as e:
            raise AtxError(f"{where}: {e}") from e
    for key in fixed:  # a plain value (distill.at.mode=sum) takes the key out, as the sweeper does
        space.pop(key, None)
    if not space:
        raise AtxError("hydra.sweeper.params: nothing to search (no key with a value range)")
    return space


def check_search(config: DictConfig) -> dict[str, Any]:
    """The start-up checks of a search that need no study; returns its search space."""
    if not OmegaConf.select(config, "data.val_split", default=0):
        raise AtxError("a search minimises the held-out error, and data.val_split=0 holds out "
                       "no images: set data.val_split>0 (e.g. data.val_split=5000); the test "
                       "error is never the objective")
    direction = str(config.hydra.sweeper.get("direction", "minimize")).rsplit(".", 1)[-1]
    if direction != "minimize":
        raise AtxError(f"hydra.sweeper.direction={direction}: the objective is an error %: "
                       "minimize")
    return search_space(config)


def settings_key(config: DictConfig, searched: list[str]) -> str:
    """The key of what every trial shares: the config without the searched keys and without
    what may change between launches (where data and logs are); the seed counts."""
    task = OmegaConf.to_container(config, resolve=False)
    task.pop("hydra", None)
    resolved = OmegaConf.to_container(OmegaConf.create(task), resolve=True, enum_to_str=True)
    return config_key(resolved, (*(k for k in UNGROUPED if k != "seed"), *searched))


def launch_folder(sweep_dir: Path) -> str:
    """A new folder name for this launch's trials: its start time (a suffix if taken)."""
    name = folder = time.strftime("%Y-%m-%d_%H-%M-%S")
    count = 1
    while (sweep_dir / folder).exists():
        count += 1
        folder = f"{name}-{count}"
    return folder


def fail(error: AtxError) -> NoReturn:
    print(f"atx: error: {error}", file=sys.stderr)
    sys.exit(2)


class SearchCallback(Callback):
    """Start-up checks and resume before the sweeper, the test error after each trial."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # ${hydra:...} in names; not set this early
        try:
            space = check_search(config)
            self._prepare_study(config, list(space))
        except Exception as e:  # Hydra would turn it into a warning and search unchecked
            release()
            if OmegaConf.select(config, "debug", default=False):
                raise
            fail(e if isinstance(e, AtxError) else AtxError(f"search set-up: {reason(e)}"))

    def _prepare_study(self, config: DictConfig, searched: list[str]) -> None:
        import optuna
        from optuna.trial import TrialState

        sweeper = config.hydra.sweeper
        database = sqlite_path(sweeper.storage)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
            lock = try_lock(database.with_name(database.name + ".lock"))
            if lock is None:
                raise AtxError(f"study '{sweeper.study_name}' in '{database}' is being searched "
                               "by another process: wait for it, or give another "
                               "hydra.sweeper.study_name")
            _held.append(lock)
        study = optuna.create_study(study_name=sweeper.study_name, storage=sweeper.storage,
                                    direction="minimize", load_if_exists=True)
        key = settings_key(config, searched)
        recorded = study.user_attrs.get(CONFIG_ATTR)
        if recorded is not None and recorded != key:
            raise AtxError(f"study '{sweeper.study_name}' in '{sweeper.storage}' was started "
                           "with other settings: give another hydra.sweeper.study_name (or "
                           "hydra.sweep.dir) for these, or the first launch's overrides")
        study.set_user_attr(CONFIG_ATTR, key)
        if database is not None:  # locked: a running trial belongs to a killed launch
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
                study.enqueue_trial(trial.params)  # its parameters run again, first
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=states))
        missing = max(int(sweeper.n_trials) - done, 0)
        with read_write(config.hydra), open_dict(config.hydra):
            sweeper.n_trials = missing  # what the sweeper (built from this config) runs now
            if OmegaConf.to_container(config.hydra.sweep)["subdir"] == "${hydra.job.num}":
                # a folder per launch: Hydra composes each job from these overrides
                subdir = launch_folder(Path(config.hydra.sweep.dir)) + "/${hydra.job.num}"
                config.hydra.sweep.subdir = subdir
                config.hydra.overrides.hydra.append(f"hydra.sweep.subdir={subdir}")
        print(f"atx: search '{sweeper.study_name}': {done} trials finished, {missing} to run"
              f" (storage {sweeper.storage})", file=sys.stderr)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Rank 0 of a trial: its test error and run dir beside the objective (user attrs)."""
        run_dir = Path(config.hydra.runtime.output_dir)
        metrics_file = run_dir / "metrics.json"
        if not config.hydra.sweeper.storage or not is_rank_zero() or not metrics_file.is_file():
            return  # storage null: the study lives in the sweeper's memory only
        import optuna
        from optuna.trial import TrialState

        metrics = json.loads(metrics_file.read_text())
        overrides = {str(o) for o in config.hydra.overrides.task}
        study = optuna.load_study(study_name=config.hydra.sweeper.study_name,
                                  storage=config.hydra.sweeper.storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.params and all(f"{k}={v}" in overrides for k, v in trial.params.items()):
                for name, metric in (("test_error", "val/error"),
                                     ("selected_test_error", "selected/test_error")):
                    if metrics.get(metric) is not None:
                        study._storage.set_trial_user_attr(trial._trial_id, name,
                                                           float(metrics[metric]))
                study._storage.set_trial_user_attr(trial._trial_id, "run_dir", str(run_dir))
                return

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import optuna

        sweeper = config.hydra.sweeper
        if sweeper.storage:
            study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
            write_trials(study, Path(config.hydra.sweep.dir) / "trials.csv")
        release()


def release() -> None:
    """Give up this launch's study lock."""
    while _held:
        _held.pop().close()


def write_trials(study: Any, path: Path) -> None:
    """Every trial of ``study``: number, state, held-out error (the objective), test error,
    its parameters and run dir."""
    trials = study.get_trials(deepcopy=False)
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", "heldout_error", "test_error", *params, "run_dir"])
        for t in trials:
            writer.writerow([t.number, t.state.name, t.value, t.user_attrs.get("test_error"),
                             *(t.params.get(k) for k in params), t.user_attrs.get("run_dir")])

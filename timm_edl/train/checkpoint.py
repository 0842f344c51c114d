"""The run folder and its resumable states (``<output>/checkpoints/step_<update>/``).

A state is accelerate's ``save_state`` (model, optimizer, scheduler, EMA and the
:class:`TrainState` registered with ``register_for_checkpointing``) plus ``progress.json``,
written last: a folder without it is an interrupted save and is never resumed from.
States are saved only right after an optimizer step.

The folders are named and rotated here rather than by accelerate's
``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)``, which names them
``checkpoint_<number of saves>`` (ours carry the optimizer update they were saved at, which
``--resume <folder>`` and the docs refer to), deletes the oldest state *before* writing the
new one (with ``keep_checkpoints: 1`` a kill during the save would leave nothing to resume),
and resumes from the highest-numbered folder even when its save was interrupted.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from ..layers.edl import edl_layers
from .config import RUNTIME_KEYS, ConfigError, TrainConfig, build_config, config_diff

__all__ = ['CHECKPOINT_DIR', 'RUN_MARKER', 'RunDirError', 'TrainState', 'latest_checkpoint', 'check_run_dir',
           'check_same_recipe', 'save_checkpoint', 'truncate_summary']

CHECKPOINT_DIR = 'checkpoints'
PROGRESS_FILE = 'progress.json'  # written last into a checkpoint folder: marks it complete
RUN_MARKER = 'config.yaml'
SUMS = ('n', 'loss', 'clean_n', 'clean_loss', 'clean_correct', 'robust_n', 'robust_loss', 'robust_correct')


class RunDirError(ConfigError):
    """The output folder cannot be used as asked (exists, nothing to resume, ...)."""


class TrainState:
    """Loop position, epoch metric sums, best-checkpoint tracking and EDL step caches;
    saved with the accelerate state (``register_for_checkpointing``)."""

    def __init__(self, models: Dict[str, nn.Module], device: Union[str, torch.device] = 'cpu'):
        self.models = models  # name -> module whose EDL power vectors are saved
        self.device = torch.device(device)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_update = 0
        self.eval_pending = False
        self.sums = self.zero_sums()  # the epoch's SUMS, float64 on the device: adding to them reads nothing back
        self.epoch_time = 0.0
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.stopped: Optional[str] = None  # 'time_budget' / 'interrupted': why the run stopped early
        self._edl_vectors: Dict[str, torch.Tensor] = {}
        self._edl_current: set = set()

    def zero_sums(self) -> torch.Tensor:
        return torch.zeros(len(SUMS), dtype=torch.float64, device=self.device)

    def progress(self) -> Dict[str, Any]:
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, global_update=self.global_update,
                    eval_pending=self.eval_pending, best_metric=self.best_metric, best_epoch=self.best_epoch,
                    stopped=self.stopped)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.eval_pending = False
        self.sums = self.zero_sums()
        self.epoch_time = 0.0

    def state_dict(self) -> Dict[str, Any]:
        vectors, current = {}, []
        for prefix, model in self.models.items():
            for name, layer in edl_layers(model):
                vectors[f'{prefix}:{name}'] = layer.power_vector.detach().cpu().clone()
                if layer.lipschitz_is_current():
                    current.append(f'{prefix}:{name}')
        return dict(self.progress(), sums=dict(zip(SUMS, self.sums.tolist())), epoch_time=self.epoch_time,
                    edl_power_vectors=vectors, edl_lipschitz_current=current)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ('epoch', 'step_in_epoch', 'global_update', 'eval_pending', 'best_metric', 'best_epoch',
                    'epoch_time'):
            setattr(self, key, state[key])
        self.sums = torch.tensor([state['sums'][k] for k in SUMS], dtype=torch.float64, device=self.device)
        self._edl_vectors = dict(state['edl_power_vectors'])
        self._edl_current = set(state.get('edl_lipschitz_current', ()))  # states saved before it: none

    def restore_edl_caches(self) -> None:
        """After ``load_state``: give every EDL layer its saved power-iteration vector and
        mark its cached L stale where it was stale at the save (a state saved right after an
        optimizer step, whose weight update the uninterrupted run refreshes L for, warm-started);
        an L that was current (the epoch's validation ran since the step) stays in use."""
        for prefix, model in self.models.items():
            for name, layer in edl_layers(model):
                vector = self._edl_vectors.get(f'{prefix}:{name}')
                if vector is not None:  # empty: L was never computed; a cold start follows, as it would have
                    layer.power_vector = vector.to(layer.weight.device)
                if f'{prefix}:{name}' not in self._edl_current:
                    with torch.no_grad():
                        layer.weight.add_(0)  # bump the version counter: the cached L gets refreshed
        self._edl_vectors, self._edl_current = {}, set()


def latest_checkpoint(output: Union[str, Path]) -> Optional[Path]:
    """The newest complete checkpoint folder of a run, or None."""
    root = Path(output) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and (p / PROGRESS_FILE).is_file()]
    return max(done, key=lambda p: json.loads((p / PROGRESS_FILE).read_text())['global_update'], default=None)


def read_progress(checkpoint: Path) -> Dict[str, Any]:
    """The loop position a complete checkpoint folder was saved at."""
    return json.loads((checkpoint / PROGRESS_FILE).read_text())


def check_run_dir(output: Path, resume: Union[None, bool, str], overwrite: bool) -> Optional[Path]:
    """Returns the checkpoint to resume from (None for a fresh run); raises RunDirError."""
    if resume:
        if isinstance(resume, str):
            ckpt = Path(resume)
            if not (ckpt / PROGRESS_FILE).is_file():
                raise RunDirError(f"--resume {resume}: not a complete timm-edl checkpoint folder "
                                  f"(no {PROGRESS_FILE})")
            return ckpt
        ckpt = latest_checkpoint(output)
        if ckpt is None:
            raise RunDirError(f"--resume: no complete checkpoint under {output / CHECKPOINT_DIR}; start the run "
                              f"without --resume")
        return ckpt
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise RunDirError(f"output folder {output} already exists and is not empty. Pass --overwrite to "
                              f"replace it, --resume to continue its run, or --output <dir> for a new one.")
        if not (output / RUN_MARKER).is_file():
            raise RunDirError(f"--overwrite refused: {output} does not look like a timm-edl run folder (no "
                              f"{RUN_MARKER}); delete it yourself or choose another --output")
    return None


def check_same_recipe(saved: Path, cfg: TrainConfig) -> None:
    """A resumed run must use the config it was started with (runtime keys aside)."""
    if not saved.is_file():
        return
    import yaml
    diff = config_diff(build_config(yaml.safe_load(saved.read_text()), str(saved)), cfg)
    if diff:
        lines = ', '.join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise RunDirError(f"--resume with a different config than {saved}: {lines}. Resume with the same "
                          f"recipe (only {', '.join(sorted(RUNTIME_KEYS))} may change) or start a new run.")


def save_checkpoint(accelerator, state: TrainState, output: Path, keep: int) -> Path:
    """Save the accelerate state as ``checkpoints/step_<update>``, then delete all but the
    newest ``keep`` complete states.  Collective: every process calls it."""
    totals = accelerator.reduce(state.sums.clone(), 'sum')
    # the saved sums are the all-rank totals, held by the main process only
    state.sums = totals if accelerator.is_main_process else state.zero_sums()
    folder = output / CHECKPOINT_DIR / f'step_{state.global_update:09d}'
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and folder.exists():  # an interrupted save, or a re-run from an older state
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / PROGRESS_FILE).write_text(json.dumps(state.progress()))
        done = sorted((p for p in folder.parent.iterdir() if (p / PROGRESS_FILE).is_file()), key=lambda p: p.name)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def truncate_summary(path: Path, keep_before_epoch: int) -> None:
    """Drop summary rows of epochs that the resumed run will redo."""
    if not path.is_file():
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < keep_before_epoch]
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(kept)

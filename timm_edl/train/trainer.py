"""``timm-edl train``'s entry point: set a run up on accelerate and loop over its epochs.

accelerate does device placement, mixed precision, gradient accumulation, data
parallelism and the checkpoint state (``save_state`` / ``load_state``); timm provides the
optimizer, the LR schedule, the EMA and the summary CSV.  The pieces live in
:mod:`.data` (seeded data order and augmentation), :mod:`.model` (model, initial weights,
EDL stages), :mod:`.loop` (an epoch and its end), :mod:`.validation`, :mod:`.checkpoint`
(run folder, resumable states) and :mod:`.export`.

Reproducibility and exact resumption
------------------------------------
All randomness of a run is a pure function of ``seed`` and the position in the run (data
order, augmentation, the attacks' random starts), so nothing random has to be saved, and a
run killed at any point and resumed from its last state ends with the same weights as an
uninterrupted run (bitwise on CPU; up to non-deterministic kernels on GPU).  States hold
model, optimizer, scheduler, EMA and the loop position (:class:`TrainState`), including the
EDL layers' power-iteration vectors, so the step sizes ``1/L`` continue exactly as they
would have.  Every epoch's metrics (``summary.csv``) hold each layer's beta (``beta/<layer>``).

Speed keys: ``data_on_device`` (:class:`~.data.DeviceBatches` instead of a data loader),
``channels_last``, ``compile`` (accelerate's ``TorchDynamoPlugin``; the attacks are crafted
on the unwrapped model compiled the same way), ``mixed_precision``.  ``time_budget_min``
stops the run at an optimizer step once that much wall time (from the call of :func:`train`)
has passed: the state is saved, ``final/`` exported and ``--resume`` continues it.  A Ctrl-C
does the same at the next optimizer step (:func:`stop_on_ctrl_c`); a second one stops at once.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .. import data as D
from .._accelerate_compat import reset_accelerate_state
from ..layers.edl import edl_layers
from .checkpoint import (
    CHECKPOINT_DIR, RUN_MARKER, SUMS, RunDirError, TrainState, check_run_dir, check_same_recipe, latest_checkpoint,
    read_progress, truncate_summary,
)
from .config import ConfigError, TrainConfig, save_config
from .data import prepare_data
from .export import export_model
from .loop import Run, export_final, finish_epoch, progress_bar_enabled, start_epoch, train_one_epoch
from .model import build_model, enter_stage, param_groups, stage_for

__all__ = ['train', 'open_run', 'TrainResult', 'TrainState', 'RunDirError', 'build_model', 'param_groups',
           'latest_checkpoint', 'export_model', 'CHECKPOINT_DIR']


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""
    output: Path
    model: nn.Module                       # the trained model (unwrapped, on the training device)
    ema: Optional[nn.Module] = None
    completed: bool = True                 # False when stopped before the last epoch
    stop_reason: Optional[str] = None      # 'time_budget', 'interrupted' or 'stop_after_steps' when stopped early
    global_update: int = 0
    last_eval: Dict[str, float] = field(default_factory=dict)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    seen_indices: Optional[torch.Tensor] = None  # dataset indices this rank trained on (this process only)


def train(cfg: TrainConfig, *, resume: Union[None, bool, str] = None, overwrite: bool = False) -> TrainResult:
    """Run the training described by ``cfg`` (on every process of an ``accelerate launch``).

    ``resume``: ``True`` continues from the newest complete state in ``cfg.output``, a path
    from that checkpoint folder.  Returns a :class:`TrainResult` on every process.
    """
    with open_run(cfg, resume=resume, overwrite=overwrite) as run:
        return _train(run)


@contextlib.contextmanager
def open_run(cfg: TrainConfig, *, resume: Union[None, bool, str] = None, overwrite: bool = False) -> Iterator[Run]:
    """The run :func:`train` trains (folder, data, model, optimizer, schedule, state), set up
    on accelerate; :func:`~.loop.train_step` takes one optimizer step of it (a planner can time
    a few that way).  ``time_budget_min`` counts from here."""
    try:
        run = _start_run(cfg, resume, overwrite, time.time())
        yield run
        run.accelerator.end_training()
    finally:
        if int(os.environ.get('WORLD_SIZE', '1')) == 1:
            reset_accelerate_state()


@contextlib.contextmanager
def stop_on_ctrl_c(run: Run) -> Iterator[None]:
    """The first Ctrl-C (SIGINT) asks the run to stop after the current optimizer step (or
    the epoch's validation) with its state saved; a second one raises ``KeyboardInterrupt``
    at once.  Left as it is where SIGINT is ignored (a background job) or off the main thread."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        if run.interrupted:
            raise KeyboardInterrupt
        run.interrupted = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_STOPPED = {'time_budget': lambda cfg: f"on the time budget ({cfg.time_budget_min:g} min)",
            'interrupted': lambda cfg: "on Ctrl-C"}


def _train(run: Run) -> TrainResult:
    cfg, state, stop = run.cfg, run.state, None
    with stop_on_ctrl_c(run):
        for epoch in range(state.epoch, cfg.epochs):
            start_epoch(run, epoch)
            if not state.eval_pending:
                stop = train_one_epoch(run, epoch)
                if stop == 'stop_after_steps':  # a simulated crash: nothing saved
                    run.log(f"stopped after {state.global_update} optimizer steps (stop_after_steps); continue "
                            f"with --resume")
                    break
                state.eval_pending, state.stopped = stop is None, stop
                run.save()
            if stop is None:
                finish_epoch(run, epoch)
                if epoch + 1 < cfg.epochs:
                    stop = state.stopped = run.stop_requested()
                    if stop:
                        run.save()
            if stop:
                run.log(f"stopped {_STOPPED[stop](cfg)} after {state.global_update} optimizer steps (epoch "
                        f"{state.epoch + 1}, batch {state.step_in_epoch}); state saved, continue with --resume")
                break
    if stop != 'stop_after_steps':
        export_final(run)
    return TrainResult(
        output=run.output, model=run.raw, ema=run.ema.module if run.ema is not None else None,
        completed=stop is None, stop_reason=stop, global_update=state.global_update, last_eval=run.last_eval,
        best_metric=state.best_metric, best_epoch=state.best_epoch,
        seen_indices=torch.cat(run.seen) if run.seen else torch.zeros(0, dtype=torch.long))


class _RunLog:
    """Prints on the main process and appends to ``log.txt`` once the run folder exists
    (messages from before are written then)."""

    def __init__(self, path: Path, cfg: TrainConfig, is_main: bool):
        self.path, self.is_main = path, is_main
        self.use_tqdm = progress_bar_enabled(cfg, is_main)
        self.pending: Optional[List[str]] = []  # None once the folder is ready

    def __call__(self, message: str) -> None:
        if not self.is_main:
            return
        if self.use_tqdm:
            from tqdm.auto import tqdm
            tqdm.write(message)
        else:
            print(message, flush=True)
        if self.pending is None:
            with open(self.path, 'a') as f:
                f.write(message + '\n')
        else:
            self.pending.append(message)

    def folder_ready(self) -> None:
        if self.is_main and self.pending:
            with open(self.path, 'a') as f:
                f.write(''.join(m + '\n' for m in self.pending))
        self.pending = None


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import TorchDynamoPlugin

    # Launched with several processes (accelerate launch --multi_gpu / torchrun) on a machine
    # without GPUs: data-parallel on CPU (gloo), which accelerate only does when told cpu=True.
    multi_cpu = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.cuda.is_available()
    # No DDP buffer broadcast at every forward: TRADES and MART run two forwards per step, and the
    # in-place broadcast into the BatchNorm statistics between them breaks the backward of the first
    # (torch 2.11); BN statistics are synced from rank 0 at every epoch end instead (distribute_bn).
    ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
    dynamo = TorchDynamoPlugin(backend=cfg.compile_backend, mode=cfg.compile_mode) if cfg.compile else None
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                       rng_types=[], step_scheduler_with_optimizer=False, cpu=multi_cpu,
                       kwargs_handlers=[ddp_kwargs], dynamo_plugin=dynamo)


def _craft_eps(cfg: TrainConfig, info: D.DatasetInfo) -> float:
    if cfg.eps is not None:
        return cfg.eps
    if info.default_eps_linf is None:
        raise ConfigError(f"{info.display_name} has no default eps; set eps")
    if cfg.norm != 'Linf' and cfg.objective != 'natural':
        raise ConfigError("set eps explicitly for the L2 threat model")
    return float(info.default_eps_linf)


def _start_run(cfg: TrainConfig, resume: Union[None, bool, str], overwrite: bool, started: float) -> Run:
    """Check the run folder, build data and model, create the folder, prepare everything
    with accelerate and load the state to resume from."""
    from accelerate.utils import set_seed

    accelerator = _accelerator(cfg)
    is_main = accelerator.is_main_process
    output = Path(cfg.output)
    ckpt = check_run_dir(output, resume, overwrite)
    if ckpt is not None:
        check_same_recipe(output / RUN_MARKER, cfg)
    log = _RunLog(output / 'log.txt', cfg, is_main)

    # data and model first: their errors must not leave a half-made run folder behind
    set_seed(cfg.seed)  # the same initial weights on every rank
    data = prepare_data(cfg, accelerator)
    eps = _craft_eps(cfg, data.info)
    model = build_model(cfg, data.info, log=log)

    accelerator.wait_for_everyone()
    if is_main:
        if ckpt is None and output.exists():  # --overwrite of a run folder (check_run_dir allowed it)
            shutil.rmtree(output)
        output.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            save_config(cfg, output / RUN_MARKER)
    log.folder_ready()
    accelerator.wait_for_everyone()

    has_edl = bool(edl_layers(model))
    if cfg.elastic_from_epoch is not None and not has_edl:
        log(f"note: {cfg.model} has no EDL layers; elastic_from_epoch is ignored")
    stage = stage_for(cfg, read_progress(ckpt)['epoch'] if ckpt is not None else 0) if has_edl else None
    if stage is not None:  # beta starts from elastic_beta_init only in a fresh run elastic from epoch 0
        enter_stage(model, stage, cfg.elastic_beta_init if ckpt is None else None)
    # Created (and wrapped) with beta possibly frozen: see loop.py on DDP.
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, param_group_fn=lambda m: param_groups(m, cfg.weight_decay),
                                    **cfg.opt_kwargs)
    model = model.to(accelerator.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    ddp_param_ids = {id(p) for p in model.parameters() if p.requires_grad}
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, data.val_loader)
    train_loader = data.train_loader if cfg.data_on_device else accelerator.prepare(data.train_loader)
    raw = accelerator.unwrap_model(model, keep_torch_compile=False)
    craft_model = torch.compile(raw, **accelerator.state.dynamo_plugin.to_kwargs()) if cfg.compile else raw
    scheduler = _scheduler(cfg, optimizer, math.ceil(len(train_loader) / cfg.grad_accum_steps))
    state = TrainState({'model': raw, **({'ema': ema.module} if ema is not None else {})}, accelerator.device)
    for extra in (scheduler, ema, state):
        if extra is not None:
            accelerator.register_for_checkpointing(extra)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state.restore_edl_caches()
        if not is_main:  # the saved sums are the all-rank totals; keep them once
            state.sums = state.zero_sums()
        if is_main:
            truncate_summary(output / 'summary.csv', state.epoch)
        log(f"resumed from {ckpt} (epoch {state.epoch}, batch {state.step_in_epoch}, "
            f"update {state.global_update})")

    info, world = data.info, accelerator.num_processes
    log(f"timm-edl train: {cfg.model} ({sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, "
        f"{len(edl_layers(raw))} EDL layers) on {info.display_name}, objective {cfg.objective}, eps {eps:.4g} "
        f"{cfg.norm}; {world} process(es) on {accelerator.device}, mixed precision {cfg.mixed_precision}, "
        f"global batch {cfg.batch_size * world * cfg.grad_accum_steps}; output {output}")
    if cfg.val_split == 'test' and data.val_loader is not None:
        log("val_split test: the test images are reported each epoch but select nothing (no best/ export)")
    return Run(
        cfg=cfg, accelerator=accelerator, output=output, log=log, model=model, raw=raw, craft_model=craft_model,
        optimizer=optimizer,
        scheduler=scheduler, ema=ema, train_loader=train_loader, sampler=data.sampler, val_loader=val_loader,
        state=state, eps=eps, val_eps=cfg.val_eps if cfg.val_eps is not None else eps, info=info,
        has_edl=has_edl, ddp_param_ids=ddp_param_ids, stage=stage,
        deadline=started + 60.0 * cfg.time_budget_min if cfg.time_budget_min is not None else None)


def _scheduler(cfg: TrainConfig, optimizer, updates_per_epoch: int):
    """timm's scheduler for the run's ``epochs``; with ``warmup_prefix`` the warmup comes first
    and the main schedule spans the remaining ``epochs - warmup_epochs`` (so ``sched: poly``,
    ``decay_rate: 1``, ``warmup_lr: 0`` is the one-cycle "triangle" of fast AT)."""
    main_epochs = cfg.epochs - cfg.warmup_epochs if cfg.warmup_prefix else cfg.epochs
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=main_epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, warmup_prefix=cfg.warmup_prefix,
        step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=updates_per_epoch)
    return scheduler


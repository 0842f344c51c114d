"""One epoch of adversarial training and its end (summary, validation, best export).

accelerate does device placement, mixed precision (``autocast``), gradient accumulation
(``accumulate``) and the cross-process reductions; timm's ``ModelEmaV3`` the EMA,
``distribute_bn`` the BatchNorm sync and ``update_summary`` the summary CSV.

The attack's random start for batch ``b`` of epoch ``e`` on rank ``r`` is seeded by
``(seed, e, b, r)``, so a resumed run crafts exactly the inputs of an uninterrupted one; so is
the Gaussian noise of ``sigma`` (its own stream).
Under DDP, parameters that were frozen when the model was wrapped (beta, until the elastic
stage) are not reduced by DDP: their gradients are averaged here.

The epoch's metric sums stay on the device (read at the epoch's end and at saves), so a step
reads nothing back to the host for them; ``time_budget_min`` (on the host clock) and a Ctrl-C
are checked after every optimizer step (under several processes the ranks agree by a reduction).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import distribute_bn, update_summary
from tqdm.auto import tqdm

from .. import data as D
from .awp import perturb_weights
from .checkpoint import SUMS, TrainState, save_checkpoint
from .config import TrainConfig
from .data import DeviceBatches, EpochShuffleSampler, mix_seed
from .export import eval_results, export_model
from .model import beta_metrics, enter_stage, stage_for
from .objectives import craft, needs_clean_forward, training_loss
from .validation import validate

__all__ = ['Run', 'start_epoch', 'train_one_epoch', 'train_step', 'finish_epoch', 'export_final']


@dataclass
class Run:
    """A run in progress: the config, accelerate's prepared objects and the loop state."""
    cfg: TrainConfig
    accelerator: Any
    output: Path
    log: Callable[[str], None]
    model: nn.Module                  # as prepared (DDP-wrapped with several processes, compiled with compile)
    raw: nn.Module                    # the same model unwrapped
    craft_model: nn.Module            # what crafts the attacks: raw, or raw compiled
    optimizer: Any
    scheduler: Any
    ema: Any                          # timm ModelEmaV3 or None
    train_loader: Any                 # a prepared DataLoader or DeviceBatches
    sampler: EpochShuffleSampler
    val_loader: Any                   # None: no validation
    state: TrainState
    eps: float
    val_eps: float
    info: D.DatasetInfo
    has_edl: bool = False
    ddp_param_ids: set = field(default_factory=set)  # parameters DDP reduces (trainable when wrapped)
    stage: Optional[str] = None
    extra_params: List[nn.Parameter] = field(default_factory=list)  # trainable now, not reduced by DDP
    seen: List[torch.Tensor] = field(default_factory=list)
    last_eval: Dict[str, float] = field(default_factory=dict)
    t0: float = 0.0                   # start of the epoch's time not yet in state.epoch_time
    attack_generator: Optional[torch.Generator] = None
    noise_generator: Optional[torch.Generator] = None
    deadline: Optional[float] = None  # time.time() at which time_budget_min is used up
    interrupted: bool = False         # set by the first Ctrl-C (see trainer.stop_on_ctrl_c)

    def stop_requested(self) -> Optional[str]:
        """'interrupted' after a first Ctrl-C, 'time_budget' once ``time_budget_min`` is used
        up, else None (the same answer on every process: one rank's flag decides for all)."""
        flags = [self.interrupted, self.deadline is not None and time.time() >= self.deadline]
        if self.accelerator.num_processes > 1:
            summed = self.accelerator.reduce(torch.tensor(flags, dtype=torch.float32, device=self.accelerator.device),
                                             'sum')
            flags = [bool(v > 0) for v in summed.tolist()]
        return 'interrupted' if flags[0] else 'time_budget' if flags[1] else None

    def save(self) -> None:
        """Bank the epoch's time and save the state."""
        self.state.epoch_time += time.time() - self.t0
        save_checkpoint(self.accelerator, self.state, self.output, self.cfg.keep_checkpoints)
        self.t0 = time.time()


def start_epoch(run: Run, epoch: int) -> None:
    """Enter the epoch's EDL stage, set the LR schedule and the data order."""
    cfg, raw = run.cfg, run.raw
    wanted = stage_for(cfg, epoch) if run.has_edl else None
    if wanted is not None and wanted != run.stage:
        enter_stage(raw, wanted, cfg.elastic_beta_init)
        released = wanted == 'elastic' and cfg.elastic_beta_init is not None
        start = f", beta from {cfg.elastic_beta_init:g}" if released else ''
        run.log(f"epoch {epoch + 1}: EDL beta mode -> {wanted} (set_beta_mode{start})")
        run.stage = wanted
    if run.accelerator.num_processes > 1:
        run.extra_params = [p for p in raw.parameters() if p.requires_grad and id(p) not in run.ddp_param_ids]
    if run.scheduler is not None:
        run.scheduler.step(epoch)
        run.scheduler.step_update(run.state.global_update)
    run.sampler.set_epoch(epoch)
    run.t0 = time.time()


def progress_bar_enabled(cfg: TrainConfig, is_main: bool) -> bool:
    """tqdm bars on the main process: always, never, or when stderr is a terminal."""
    if not is_main or cfg.progress == 'never':
        return False
    return cfg.progress == 'always' or sys.stderr.isatty()


def _batches(run: Run, epoch: int, skip: int):
    """The epoch's ``(x, y, index)`` batches from the ``skip``-th on."""
    if isinstance(run.train_loader, DeviceBatches):
        return run.train_loader.batches(epoch, skip)
    loader = run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    loader.set_epoch(epoch)  # accelerate re-sets the sampler's epoch from its own counter on iter()
    run.sampler.set_epoch(epoch)
    return loader


def train_one_epoch(run: Run, epoch: int) -> Optional[str]:
    """Train the rest of ``epoch``; returns why it stopped early ('stop_after_steps',
    'time_budget', 'interrupted'), None when the epoch is done."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    run.model.train()
    skip = state.step_in_epoch
    loader = _batches(run, epoch, skip)
    bar = tqdm(loader, total=len(run.train_loader), initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not progress_bar_enabled(cfg, accelerator.is_main_process), leave=False, dynamic_ncols=True)
    with bar:
        for x, y, index in bar:
            run.seen.append(index.detach().cpu())
            train_step(run, epoch, x, y)
            state.step_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.global_update += 1
            if run.ema is not None:
                run.ema.update(run.raw, step=state.global_update)
            if run.scheduler is not None:
                run.scheduler.step_update(state.global_update)
            if not bar.disable and state.step_in_epoch % 10 == 0:
                bar.set_postfix(loss=f"{float(state.sums[1] / state.sums[0].clamp_min(1)):.3f}")
            if cfg.save_every_steps and state.global_update % cfg.save_every_steps == 0:
                run.save()
            if cfg.stop_after_steps is not None and state.global_update >= cfg.stop_after_steps:
                return 'stop_after_steps'
            if state.step_in_epoch < len(run.train_loader):
                stop = run.stop_requested()
                if stop:
                    return stop
    return None


def add_noise(run: Run, epoch: int, x: torch.Tensor) -> torch.Tensor:
    """``x + sigma * n`` with ``n ~ N(0, I)`` of the shape of ``x`` (unclipped: randomized
    smoothing's training distribution), ``n`` seeded by ``(seed, epoch, batch, rank)``."""
    if run.noise_generator is None:
        run.noise_generator = torch.Generator(device=x.device)
    run.noise_generator.manual_seed(
        mix_seed(run.cfg.seed, 6, epoch, run.state.step_in_epoch, run.accelerator.process_index))
    return x + run.cfg.sigma * torch.randn(x.shape, generator=run.noise_generator, device=x.device, dtype=x.dtype)


def train_step(run: Run, epoch: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """Craft the inputs of batch ``(x, y)``, take one (accumulated) optimizer step and add the
    batch's metrics to ``run.state.sums``; the attack's random start is seeded by the position.
    With ``sigma > 0`` (objective natural) the model trains on :func:`add_noise` of ``x``."""
    cfg, accelerator, model, raw = run.cfg, run.accelerator, run.model, run.raw
    if cfg.sigma > 0:
        x = add_noise(run, epoch, x)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if run.attack_generator is None:
        run.attack_generator = torch.Generator(device=accelerator.device)
    generator = run.attack_generator.manual_seed(
        mix_seed(cfg.seed, 4, epoch, run.state.step_in_epoch, accelerator.process_index))
    clean_eval = None
    if not needs_clean_forward(cfg.objective):
        # clean metrics for objectives whose loss sees only x_adv: an eval-mode forward
        # before the update (so the state saved after it stays consistent)
        raw.eval()
        with torch.no_grad(), accelerator.autocast():
            clean_eval = run.craft_model(x).detach()
        raw.train()
    loss_fn = dict(trades_beta=cfg.trades_beta, mart_beta=cfg.mart_beta)
    with accelerator.accumulate(model):
        x_in = craft(cfg.objective, run.craft_model, x, y, eps=run.eps, norm=cfg.norm, steps=cfg.attack_steps,
                     step_size=cfg.attack_step_size, fast_alpha=cfg.fast_alpha, craft_bn=cfg.craft_bn,
                     generator=generator)
        awp = None
        if cfg.awp_gamma > 0 and epoch >= cfg.awp_warmup:  # AWP: the loss at w + v (awp.py)
            with accelerator.autocast():
                awp = perturb_weights(raw, lambda m: training_loss(cfg.objective, m, x, x_in, y, **loss_fn)[0],
                                      cfg.awp_gamma)
        loss, logits = training_loss(cfg.objective, model, x, x_in, y, **loss_fn)
        accelerator.backward(loss)
        if awp is not None:
            awp.restore()  # w exactly, before the optimizer step
        if accelerator.sync_gradients:
            if run.extra_params:
                _average_gradients(accelerator, run.extra_params)
            if cfg.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    clean = logits['clean'] if logits['clean'] is not None else clean_eval
    run.state.sums += _batch_sums(loss, clean, logits['adv'], y)


def _average_gradients(accelerator, params: List[nn.Parameter]) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), 'mean')
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


@torch.no_grad()
def _batch_sums(loss: torch.Tensor, clean: Optional[torch.Tensor], adv: Optional[torch.Tensor],
                y: torch.Tensor) -> torch.Tensor:
    """The batch's contribution to the epoch's SUMS (float64, on the device)."""
    b = float(len(y))
    zero = torch.zeros((), dtype=torch.float64, device=loss.device)
    parts = [zero + b, loss.detach().double() * b]
    for logits in (clean, adv):
        if logits is None:
            parts += [zero, zero, zero]
        else:
            parts += [zero + b, F.cross_entropy(logits.float(), y).double() * b,
                      (logits.argmax(1) == y).sum().double()]
    return torch.stack(parts)


def _fmt(value: Optional[float], pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    return f"{value:.2f}%" if pct else f"{value:.4f}"


def _train_metrics(run: Run) -> Dict[str, Any]:
    """The epoch's training metrics over all processes (plus each EDL layer's beta)."""
    accelerator = run.accelerator
    s = dict(zip(SUMS, accelerator.reduce(run.state.sums.clone(), 'sum').tolist()))
    ratio = lambda a, b, pct=1.0: (pct * s[a] / s[b]) if s[b] else None  # noqa: E731
    return {
        'loss': ratio('loss', 'n'),
        'clean_loss': ratio('clean_loss', 'clean_n'), 'clean_top1': ratio('clean_correct', 'clean_n', 100.0),
        'robust_loss': ratio('robust_loss', 'robust_n'),
        'robust_top1': ratio('robust_correct', 'robust_n', 100.0),
        'stage': run.stage or ('none' if not run.has_edl else 'as-built'),
        **beta_metrics(run.raw),
    }


def finish_epoch(run: Run, epoch: int) -> None:
    """Write the epoch's summary row and log line, validate (every ``val_every`` epochs and
    at the last), export a new best model and move on to the next epoch.

    ``best/`` holds the epoch with the highest PGD accuracy (``val_select: robust``) or accuracy
    under noise ``sigma`` (``val_select: noisy``) on the held-out training images
    (``val_split: holdout``); test images (``val_split: test``) are reported, never selected on."""
    cfg, accelerator, state, raw, ema = run.cfg, run.accelerator, run.state, run.raw, run.ema
    if accelerator.num_processes > 1:  # every rank validates and exports with rank 0's BN statistics (as timm)
        distribute_bn(raw, accelerator.num_processes, reduce=False)
    train_metrics = _train_metrics(run)
    train_metrics['epoch_time'] = state.epoch_time + (time.time() - run.t0)  # training only, not validation
    do_eval = run.val_loader is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
    names = ['clean_top1', 'robust_top1'] + (['noisy_top1'] if cfg.sigma > 0 else [])
    eval_metrics: Dict[str, Any] = dict.fromkeys(names + ([f'ema_{k}' for k in names] if ema is not None else []))
    if do_eval:
        eval_metrics.update(validate(raw, run.val_loader, cfg, run.val_eps, accelerator))
        if ema is not None:
            ema_metrics = validate(ema.module, run.val_loader, cfg, run.val_eps, accelerator)
            eval_metrics.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        run.last_eval = {k: v for k, v in eval_metrics.items() if v is not None}
    lr = run.optimizer.param_groups[0]['lr']
    if accelerator.is_main_process:
        update_summary(epoch, train_metrics, eval_metrics, str(run.output / 'summary.csv'), lr=lr)
    run.log(f"epoch {epoch + 1}/{cfg.epochs} [{train_metrics['stage']}] lr {lr:.4g} | train loss "
            f"{_fmt(train_metrics['loss'], False)} clean {_fmt(train_metrics['clean_top1'])} adv "
            f"{_fmt(train_metrics['robust_top1'])} | val clean {_fmt(eval_metrics['clean_top1'])} "
            f"PGD-{cfg.val_attack_steps} {_fmt(eval_metrics['robust_top1'])}"
            + (f" noise {cfg.sigma:g} {_fmt(eval_metrics['noisy_top1'])}" if cfg.sigma > 0 else '')
            + (f" (EMA {_fmt(eval_metrics['ema_clean_top1'])} / {_fmt(eval_metrics['ema_robust_top1'])})"
               if ema is not None and do_eval else '')
            + (f" | beta {train_metrics['beta_mean']:.4f}" if 'beta_mean' in train_metrics else '')
            + f" | {train_metrics['epoch_time']:.1f}s")
    if do_eval and cfg.val_split == 'holdout':
        metric = eval_metrics[f"{'ema_' if ema is not None else ''}{cfg.val_select}_top1"]
        if state.best_metric is None or metric > state.best_metric:
            state.best_metric, state.best_epoch = metric, epoch
            if accelerator.is_main_process:
                how = _export(run, 'best', eval_metrics)
                run.log(f"new best {_SELECTED[cfg.val_select]} {metric:.2f}% at epoch {epoch + 1}: exported "
                        f"{run.output / 'best'} ({how})")
            accelerator.wait_for_everyone()
    state.next_epoch()


_SELECTED = {'robust': 'robust accuracy', 'noisy': 'accuracy under noise'}


def _export(run: Run, name: str, metrics: Dict[str, Any]) -> str:
    cfg, info = run.cfg, run.info
    results = eval_results(cfg, info, metrics, run.ema is not None, run.val_eps)
    return export_model(run.ema.module if run.ema is not None else run.raw, run.output / name, results,
                        label_names=list(info.class_names) if info.class_names else None,
                        tag=f"{info.name.replace('-', '_')}_{cfg.objective}_{cfg.norm.lower()}")


def export_final(run: Run) -> None:
    """Export the model after the last epoch to ``final/`` (with the last validation's numbers)."""
    if run.accelerator.is_main_process:
        how = _export(run, 'final', run.last_eval)
        state = run.state
        run.log(f"done: final model exported to {run.output / 'final'} ({how})"
                + (f"; best {_SELECTED[run.cfg.val_select]} {state.best_metric:.2f}% (epoch {state.best_epoch + 1}) in "
                   f"{run.output / 'best'}" if state.best_metric is not None else ''))
    run.accelerator.wait_for_everyone()

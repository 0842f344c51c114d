#!/usr/bin/env python
"""``make release-gpu``: adversarially trained, evaluated, Hub-ready CIFAR-10-JPEG weights of
``edlnet_resnet18`` and of its conv twin within ``--budget-min`` minutes on one GPU.

    bash experiments/release_gpu.sh --budget-min 8 --pack OUT    # bootstrap on a machine without a registry
    python experiments/release_gpu.py --device cuda --budget-min 8
    python experiments/release_gpu.py --device cpu --toy        # the same code path at toy size (CI)

A plan -> train -> evaluate -> export driver over :mod:`timm_edl.train`, :mod:`timm_edl.evaluation`
and :mod:`timm_edl.hub`; the budget is counted once the data is decoded.

1. **recipe**: ``recipes/edlnet_resnet18_cifar10_fast.yaml`` (fast adversarial training, FGSM-RS,
   Wong, Rice and Kolter 2020) with the overrides of :func:`train_args`: the dataset, the training
   set on the device (``data_on_device``), ``channels_last``, bf16 autocast (``--amp``), ``compile``
   (``--compile``), batch ``--batch-size``, a one-cycle learning rate (0 -> ``--lr-max`` over the
   first 2/5 of the epochs, then -> 0: timm's ``poly`` schedule with a warmup prefix), the two-stage
   beta schedule (vanilla DL for 3/4 of the epochs, then elastic) and PGD-10 validation on
   ``--val-n`` held-out training images after every epoch, whose best epoch is kept (a guard
   against catastrophic overfitting, Wong et al. 2020, sec. 5). ``release.json`` records the
   ``timm-edl train`` command that trains each model the same way;
2. **plan**: times a few optimizer steps of each model through the trainer
   (:func:`timm_edl.train.open_run`, :func:`timm_edl.train.loop.train_step`) and a float32
   input-gradient pass, and picks the number of epochs that lets both models train and be
   evaluated within the budget, training getting at least ``--min-train-share`` of it;
3. **training**: :func:`timm_edl.train.train` for the EDLNet, then its twin, each with a
   ``time_budget_min`` that leaves the later parts their estimated time;
4. **evaluation** of each best epoch with :func:`timm_edl.evaluation.evaluate` in float32: clean
   + PGD-20 on the test set with the gradient-masking checks, then AutoAttack (+ PGD-20) on the
   first ``--aa-n`` points (fewer if the time left cannot hold them; ``release.json`` says so);
5. **export**: Hub-ready folders (:func:`timm_edl.hub.export`) and ``release.json`` (plan, history,
   numbers, images/s, device, versions), written after the PGD-20 evaluation and again after
   AutoAttack; ``--pack DIR`` also splits them into parts of at most 15 MiB (:func:`pack`).

FGSM-RS costs about 5 forward-equivalents per step, PGD-10 AT about 23: 4.6x the epochs in the same
time. Wong et al. report 45 % PGD accuracy at eps 8/255 for a CIFAR-10 PreAct ResNet-18 after 6
minutes of training (AutoAttack: about 43 %, RobustBench entry Wong2020Fast). Batch 512 and
``--lr-max 0.4`` are our choice for a large GPU (Wong et al.: 128 and 0.2), not tuned here.
``--toy`` shrinks every size (widths 8-64, 256 training images, 64 test points, 16 AutoAttack
points with APGD-CE only, at most 2 epochs, a 5-minute budget).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
RECIPE = 'edlnet_resnet18_cifar10_fast'  # a shipped timm-edl train recipe
MODELS = (('edlnet', 'default'), ('conv_twin', 'none'))

#: Minimum versions the release run needs (pyautoattack travels as a wheel, release_gpu.sh).
REQUIREMENTS = {'torch': '2.11', 'timm': '1.0.31', 'accelerate': '0.30', 'huggingface-hub': '0.23',
                'safetensors': '0.4', 'pyautoattack': '0.2', 'numpy': '1.21', 'pyyaml': '5.1'}

#: Cost of each AutoAttack attack per point it attacks, in input-gradient passes (standard
#: settings): APGD-CE / APGD-DLR 100 iterations (+1); APGD-T and FAB-T 9 target classes x 100;
#: FAB 100; Square 5000 forward queries (~2500 gradient-pass equivalents).  The first attack runs
#: on the clean-correct points, the others on those still robust.
AA_PASSES = {'apgd-ce': 101, 'apgd-dlr': 101, 'apgd-t': 900, 'fab': 100, 'fab-t': 900, 'square': 2500}
AA_STANDARD = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
#: Assumed for the plan, before any model is trained: 85 % clean, 50 % robust.
PLAN_CLEAN, PLAN_ROBUST = 0.85, 0.5
#: Margin on the AutoAttack estimate (its later attacks run on few points, in small batches).
AA_SAFETY = 1.5
#: Input-gradient passes per point: clean (1) + PGD-20 (20) on the whole test set; on check_n
#: points the PGD ladder (PGD-4, PGD-40 x 2) and the large-eps sweep (20).
PGD_PASSES = 21
CHECK_PASSES = 4 + 80 + 20
PACK_PART_BYTES = 15 * 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'),
                   help='cuda (the first visible GPU; pick one with CUDA_VISIBLE_DEVICES) or cpu')
    p.add_argument('--budget-min', type=float, default=None,
                   help='wall-clock minutes for planning + training + evaluation + export (default 8; toy 5)')
    p.add_argument('--dataset', default='cifar10-jpeg', help='cifar10-jpeg (default), cifar10 or another '
                                                             'in-memory dataset of timm_edl.data')
    p.add_argument('--data-dir', default=None, help='folder with the dataset (default: .data)')
    p.add_argument('--out', default=None, help='output folder (default: runs/release-<date>-<time>)')
    p.add_argument('--toy', action='store_true', help='tiny sizes: the CI run of the same code path')
    p.add_argument('--amp', default='bf16', choices=('bf16', 'none'), help='autocast dtype of training')
    p.add_argument('--compile', action='store_true', help='torch.compile the models for training')
    p.add_argument('--no-channels-last', action='store_true', help='keep NCHW memory format')
    p.add_argument('--batch-size', type=int, default=None, help='training batch (default 512; toy 32)')
    p.add_argument('--lr-max', type=float, default=0.4, help='peak of the one-cycle learning rate')
    p.add_argument('--eps', default='8/255', help='Linf radius for training and evaluation')
    p.add_argument('--alpha', default='10/255', help='FGSM-RS step (1.25 eps)')
    p.add_argument('--craft-bn', default='eval', choices=('eval', 'train'), help="the trainer's craft_bn")
    p.add_argument('--min-epochs', type=int, default=1)
    p.add_argument('--min-train-share', type=float, default=0.4,
                   help='training gets at least this share of the time left after the plan; the AutoAttack '
                        'points are cut instead when the evaluation estimate would take more')
    p.add_argument('--max-epochs', type=int, default=None, help='cap on the planned epochs (default 40; toy 2)')
    p.add_argument('--epochs', type=int, default=None,
                   help='fix the number of epochs instead of planning it (their training then has no time budget)')
    p.add_argument('--train-n', type=int, default=None, help='train on the first n training images (all; toy 256)')
    p.add_argument('--val-n', type=int, default=None, help='held-out training images for validation (1000; toy 32)')
    p.add_argument('--test-n', type=int, default=None, help='test points for clean + PGD-20 (all; toy 64)')
    p.add_argument('--aa-n', type=int, default=None, help='first test points for AutoAttack (1000; toy 16)')
    p.add_argument('--eval-batch', type=int, default=None, help='evaluation batch (1000 on CUDA, 100 on CPU; toy 64)')
    p.add_argument('--aa-attacks', default=None,
                   help="AutoAttack 'custom' with these attacks (comma list) instead of 'standard' (toy: apgd-ce)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--check-env', action='store_true', help='check the installed versions (and the device), then exit')
    p.add_argument('--pack', default=None, metavar='DIR',
                   help='also split the results into parts of at most 15 MiB in DIR (see pack())')
    args = p.parse_args(argv)
    toy = args.toy
    defaults = dict(budget_min=5.0 if toy else 8.0, aa_attacks='apgd-ce' if toy else None,
                    batch_size=32 if toy else 512, max_epochs=2 if toy else 40, train_n=256 if toy else None,
                    val_n=32 if toy else 1000, test_n=64 if toy else None, aa_n=16 if toy else 1000,
                    eval_batch=64 if toy else (1000 if args.device == 'cuda' else 100))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [a for a in (args.aa_attacks or '').split(',') if a.strip() and a.strip() not in AA_PASSES]
    if unknown:
        p.error(f"--aa-attacks: unknown {unknown}; choose from {', '.join(AA_PASSES)}")
    if not 0.0 <= args.min_train_share < 1.0:
        p.error('--min-train-share must lie in [0, 1)')
    if args.budget_min <= 0 or args.batch_size < 1 or args.min_epochs < 1 or args.max_epochs < args.min_epochs:
        p.error('need --budget-min > 0, --batch-size >= 1 and 1 <= --min-epochs <= --max-epochs')
    if args.out is None:
        args.out = str(ROOT / time.strftime('runs/release-%Y%m%d-%H%M%S'))
    return args


# --------------------------------------------------------------------------- environment


def _version_tuple(text: str) -> Tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); '1.0.31.dev0' -> (1, 0, 31); '2.12.0rc1' -> (2, 12, 0)."""
    parts = []
    for piece in text.split('+')[0].split('.'):
        match = re.match(r'\d+', piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() < len(piece):
            break
    return tuple(parts)


def check_environment(device: str) -> Dict[str, Any]:
    """Installed versions against :data:`REQUIREMENTS`, and the device; raises SystemExit with
    every problem at once."""
    from importlib import metadata
    import torch
    versions: Dict[str, Optional[str]] = {'python': platform.python_version()}
    problems = []
    for dist, minimum in {**REQUIREMENTS, 'timm-edl': None}.items():
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
            if minimum:
                problems.append(f'{dist} is not installed (need >= {minimum})')
            continue
        if minimum and _version_tuple(versions[dist]) < _version_tuple(minimum):
            problems.append(f'{dist} {versions[dist]} is older than {minimum}')
    info: Dict[str, Any] = {'versions': versions, 'device': device}
    if device == 'cuda' and not torch.cuda.is_available():
        problems.append(f'--device {device}: CUDA is not available')
    elif device == 'cuda':
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    capability=list(torch.cuda.get_device_capability(0)),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
    info.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    if problems:
        raise SystemExit('release: environment check failed:\n  ' + '\n  '.join(problems))
    return info


# --------------------------------------------------------------------------- recipe and plan


def train_args(args, edl_layers: str, epochs: int, output: Path, budget_min: Optional[float] = None) -> List[str]:
    """``timm-edl train --config <RECIPE>`` overrides that train one model of the release."""
    warmup = min(round(0.4 * epochs), epochs - 1)
    values = {
        'dataset': args.dataset, 'data_dir': args.data_dir, 'train_n_ex': args.train_n, 'val_n_ex': args.val_n,
        'val_batch_size': args.eval_batch, 'model_kwargs.edl_layers': edl_layers, 'epochs': epochs,
        'elastic_from_epoch': max(1, int(0.75 * epochs)) if epochs > 1 else epochs,
        'batch_size': args.batch_size, 'lr': args.lr_max, 'sched': 'poly', 'decay_rate': 1.0, 'min_lr': 0.0,
        'warmup_epochs': warmup, 'warmup_lr': 0.0, 'warmup_prefix': True, 'sched_on_updates': True,
        'eps': args.eps, 'fast_alpha': args.alpha, 'craft_bn': args.craft_bn,
        'mixed_precision': 'bf16' if args.amp == 'bf16' else "'no'", 'data_on_device': True,
        'channels_last': not args.no_channels_last, 'compile': args.compile, 'num_workers': 0,
        'save_every_steps': 0, 'keep_checkpoints': 1, 'progress': 'never', 'seed': args.seed,
        'output': str(output), 'time_budget_min': budget_min,
    }
    if args.toy:
        values['model_kwargs.widths'] = '[8, 16, 32, 64]'
    return [f"--{k.replace('_', '-') if '.' not in k else k.replace('_', '-', 1)}={'null' if v is None else v}"
            for k, v in values.items()]


def _sync(device) -> None:
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def calibrate(name: str, argv: List[str], toy: bool) -> Dict[str, Any]:
    """Seconds per optimizer step of the recipe (the median of a few, after warm-up steps that
    include any compilation) and per image of a float32 input-gradient pass (the unit of the
    evaluation's cost), on a run the trainer sets up; its folder is deleted afterwards."""
    import torch
    import torch.nn.functional as F
    from timm_edl.attacks import frozen_parameters
    from timm_edl.train import load_config, open_run
    from timm_edl.train.loop import train_step
    cfg = load_config(RECIPE, argv)
    warmup, reps = (1, 2) if toy else (3, 6)
    with open_run(cfg) as run:
        x, y, _ = next(run.train_loader.batches(0))
        device, times = x.device, []
        for i in range(warmup + reps):
            _sync(device)
            t = time.perf_counter()
            train_step(run, 0, x, y)
            _sync(device)
            times.append(time.perf_counter() - t)
        step = sorted(times[warmup:])[reps // 2]
        raw = run.raw.float().eval()
        with frozen_parameters(raw):
            for _ in range(2):  # the second is timed
                _sync(device)
                t = time.perf_counter()
                xi = x.clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(raw(xi), y), xi)
                _sync(device)
                grad = (time.perf_counter() - t) / len(x)
    shutil.rmtree(cfg.output, ignore_errors=True)
    return {'model': name, 'step_seconds': step, 'train_images_per_s': len(x) / step,
            'input_grad_seconds_per_image': grad, 'input_grad_images_per_s': 1.0 / grad,
            'warmup_steps': warmup, 'timed_steps': reps}


def aa_attacks(args) -> Tuple[str, ...]:
    if args.aa_attacks:
        return tuple(a.strip() for a in args.aa_attacks.split(',') if a.strip())
    return AA_STANDARD


def aa_passes_per_point(attacks, clean: float, robust: float) -> float:
    """Expected input-gradient passes per point of AutoAttack (+ its PGD-20)."""
    first, rest = AA_PASSES[attacks[0]], sum(AA_PASSES[a] for a in attacks[1:])
    return clean * first + robust * rest + 21


def plan(args, calibration, n_train: int, n_test: int, seconds_left: float) -> Dict[str, Any]:
    """The number of epochs that fits, with the time estimates it rests on."""
    steps = n_train // args.batch_size
    check_n = 16 if args.toy else 100
    epoch_s = {n: c['step_seconds'] * steps + c['input_grad_seconds_per_image'] * args.val_n * 11
               for n, c in calibration.items()}
    aa = aa_passes_per_point(aa_attacks(args), PLAN_CLEAN, PLAN_ROBUST)
    eval_s = {n: c['input_grad_seconds_per_image'] * (n_test * PGD_PASSES + check_n * CHECK_PASSES
                                                     + AA_SAFETY * args.aa_n * aa)
              for n, c in calibration.items()}
    export_s = 5.0 if args.toy else 15.0
    left = seconds_left - 2 * export_s
    # the evaluation gets its estimate, but at most (1 - --min-train-share) of the time: beyond
    # that the AutoAttack points are cut after the PGD evaluation, not the training
    eval_reserve = min(sum(eval_s.values()), (1.0 - args.min_train_share) * left)
    fit = int((0.95 * left - eval_reserve) // sum(epoch_s.values()))
    epochs = args.epochs or max(args.min_epochs, min(args.max_epochs, fit))
    return {'seconds_left_after_calibration': round(left, 1), 'steps_per_epoch': steps,
            'epoch_seconds_estimate': {k: round(v, 2) for k, v in epoch_s.items()},
            'eval_seconds_estimate': {k: round(v, 1) for k, v in eval_s.items()},
            'eval_seconds_reserved': round(eval_reserve, 1), 'epochs_that_fit': fit, 'epochs': epochs,
            'fixed_by_flag': args.epochs is not None, 'aa_passes_per_point_assumed': aa,
            'aa_attacks': list(aa_attacks(args)), 'export_seconds_reserved': export_s}


# --------------------------------------------------------------------------- training


def train_model(args, name: str, edl_layers: str, epochs: int, output: Path, budget_min: Optional[float],
                steps_per_epoch: int) -> Dict[str, Any]:
    """One model trained by ``timm_edl.train.train``; its history read from summary.csv."""
    from timm_edl.train import load_config, train
    argv = train_args(args, edl_layers, epochs, output, budget_min)
    result = train(load_config(RECIPE, argv))
    summary = output / 'summary.csv'  # absent when the budget ended the run within its first epoch
    with open(summary, newline='') if summary.is_file() else open(os.devnull) as f:
        history = [{'epoch': int(r['epoch']) + 1, 'stage': r['train_stage'],
                    **{k: float(v) for k, v in r.items() if v and k not in ('epoch', 'train_stage')}}
                   for r in csv.DictReader(f)]
    seconds = sum(r['train_epoch_time'] for r in history)
    images = len(history) * steps_per_epoch * args.batch_size
    return {'model': name, 'epochs_done': len(history), 'planned_epochs': epochs, 'stopped': result.stop_reason,
            'best_epoch': None if result.best_epoch is None else result.best_epoch + 1,
            'global_update': result.global_update, 'train_seconds': round(seconds, 3),
            'train_images_per_s': round(images / seconds, 1) if seconds else None,
            'steps_per_epoch': steps_per_epoch, 'batch_size': args.batch_size, 'history': history,
            'weights': str(output / ('best' if result.best_epoch is not None else 'final')),
            'train_command': shlex.join(['timm-edl', 'train', '--config', RECIPE] + argv)}


# --------------------------------------------------------------------------- evaluation and export


def evaluate_model(name: str, model, x, y, info, n_total: int, args, *, autoattack: bool, footnote: str,
                   log) -> Dict[str, Any]:
    """The project's evaluation in float32: clean + PGD-20 + the gradient-masking checks on
    (x, y), or (``autoattack``) AutoAttack + PGD-20 (for the ordering check) on them."""
    from timm_edl.evaluation import EvalConfig, evaluate
    small = dict(check_n=16, grad_points=2, grad_dirs=4) if args.toy else {}
    common = dict(threat_model='Linf', eps=args.eps, pgd_steps=20, batch_size=args.eval_batch, seed=args.seed,
                  device=args.device, progress=False)
    if autoattack:
        custom = list(aa_attacks(args)) if args.aa_attacks else None
        config = EvalConfig(attacks=('autoattack', 'pgd'), checks=False, aa_attacks=custom, **common)
    else:
        config = EvalConfig(attacks=('pgd',), checks=True, **small, **common)
    return evaluate(model, x, y, config, dataset=info, split='test', n_total=n_total,
                    model_source={'spec': f'release_gpu:{name}', 'architecture': 'edlnet_resnet18'},
                    log=lambda msg: log(f'[{name}] {msg}'),
                    info={'name': f'edlnet_resnet18 ({name})', 'footnote': footnote})


def autoattack_seconds_per_point(report: Dict[str, Any], attacks) -> float:
    """AutoAttack's expected cost per point from a clean + PGD-20 report: the measured seconds
    per PGD step and image times :func:`aa_passes_per_point` at the measured accuracies."""
    per_pass = report['timings']['pgd'] / (report['n_ex'] * 20)
    return per_pass * aa_passes_per_point(attacks, report['clean_acc'], report['pgd_acc'])


def summarise(report: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if report is None:
        return None
    timings = report['timings']
    rate = lambda key: round(report['n_ex'] / timings[key], 2) if timings.get(key) else None  # noqa: E731
    return {'n_ex': report['n_ex'], 'clean_acc': report['clean_acc'], 'pgd20_acc': report['pgd_acc'],
            'autoattack_acc': report['autoattack_acc'], 'failed_checks': report['failed_checks'],
            'checks': {c['name']: c['status'] for c in report['checks']}, 'timings': timings,
            'pgd20_images_per_s': rate('pgd'), 'autoattack_points_per_s': rate('autoattack'),
            'clean_images_per_s': rate('clean'), 'weights_digest': report['weights_digest']}


def export(name: str, model, reports: List[Dict[str, Any]], out: Path, info, tag: str) -> Path:
    import copy
    from timm_edl import hub
    folder = out / 'export' / name
    hub.export(copy.deepcopy(model).cpu(), folder, eval_results=reports, overwrite=True, label_names=list(info.class_names),
               model_name=f'edlnet_resnet18.{tag}' + ('' if name == 'edlnet' else '_conv_twin'))
    return folder


def pack(out: Path, dest: Path, weights_of: str = 'edlnet') -> List[Path]:
    """Split a release folder into files of at most 15 MiB: ``release-results.tar.gz``
    (everything except weights: release.json, log, evaluation reports, the exports' config.json
    and card) and the ``weights_of`` export's model.safetensors cut into
    ``<name>-model.safetensors.part-NN`` (45 MB for edlnet_resnet18: 3 parts).  Rebuild with
    ``cat <name>-model.safetensors.part-* > model.safetensors`` and check it against
    ``weights_sha256`` in its config.json.  The twin's weights are not packed; its numbers are
    in release.json."""
    import tarfile
    dest.mkdir(parents=True, exist_ok=True)
    written = [dest / 'release-results.tar.gz']
    with tarfile.open(written[0], 'w:gz') as tar:
        tar.add(out, arcname=out.name, filter=lambda info: None if info.name.endswith('.safetensors') else info)
    with open(out / 'export' / weights_of / 'model.safetensors', 'rb') as f:
        for k, chunk in enumerate(iter(lambda: f.read(PACK_PART_BYTES), b'')):
            part = dest / f'{weights_of}-model.safetensors.part-{k:02d}'
            part.write_bytes(chunk)
            written.append(part)
    return written


# --------------------------------------------------------------------------- main


def _logger(out: Path):
    log_file = open(out / 'log.txt', 'a')

    def log(message: str) -> None:
        line = f'[release {time.strftime("%H:%M:%S")}] {message}'
        print(line, flush=True)
        log_file.write(line + '\n')
        log_file.flush()
    return log


def _table(summary: Dict[str, Any], aa_n: int, log) -> None:
    rows = [('clean (full test set)', 'eval_full', 'clean_acc'), ('PGD-20 (full test set)', 'eval_full', 'pgd20_acc'),
            (f'AutoAttack (first {aa_n})', 'eval_autoattack', 'autoattack_acc')]
    log('| accuracy | EDLNet | conv twin |')
    log('|---|---|---|')
    for label, part, key in rows:
        values = [(summary['models'][name][part] or {}).get(key) for name in ('edlnet', 'conv_twin')]
        log(f"| {label} | {' | '.join('-' if v is None else f'{100 * v:.2f} %' for v in values)} |")
    for name, m in summary['models'].items():
        failed = sorted({c for part in ('eval_full', 'eval_autoattack') for c in (m[part] or {}).get('failed_checks', [])})
        log(f"[{name}] checks: {'FAILED ' + ', '.join(failed) if failed else 'passed'}; training "
            f"{m['train_images_per_s']} img/s; {m['epochs_done']} epochs, best {m['best_epoch']}"
            + (f"; stopped on the {m['stopped']}" if m['stopped'] else ''))


def main(argv=None) -> int:
    args = parse_args(argv)
    env = check_environment(args.device)
    if args.check_env:
        print(json.dumps(env, indent=2))
        return 0
    if args.device == 'cpu':
        os.environ['ACCELERATE_USE_CPU'] = 'true'  # the trainer's Accelerator then stays on the CPU
    import timm
    import timm_edl  # noqa: F401  (registers edlnet_*)
    from timm_edl import data as D
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f'release: {out} is not empty; pass another --out')
    out.mkdir(parents=True, exist_ok=True)
    log = _logger(out)

    started = time.perf_counter()  # decode (and cache) the data once, outside the budget
    n_train = len(D.get_dataset(args.dataset, args.data_dir, 'train')) - args.val_n
    n_train = min(n_train, args.train_n or n_train)
    info = D.dataset_info(args.dataset, args.data_dir)
    n_total = len(D.get_dataset(args.dataset, args.data_dir, 'test'))
    x_test, y_test = D.load_tensors(args.dataset, args.data_dir, 'test', n_ex=args.test_n)
    data_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    budget_s = 60.0 * args.budget_min
    end = t0 + budget_s
    log(f"{info.display_name}: {n_train} training images, {args.val_n} held out, {len(x_test)} test points; "
        f"data ready in {data_seconds:.1f}s; budget {args.budget_min:g} min; recipe {RECIPE}; amp {args.amp}; "
        f"compile {args.compile}; channels_last {not args.no_channels_last}; device {args.device}")

    calibration = {name: calibrate(name, train_args(args, layers, 1, out / 'plan' / name), args.toy)
                   for name, layers in MODELS}
    for c in calibration.values():
        log(f"[plan] {c['model']}: {c['step_seconds'] * 1e3:.1f} ms per FGSM-RS step of {args.batch_size} "
            f"({c['train_images_per_s']:.0f} img/s); {c['input_grad_images_per_s']:.0f} img/s per float32 "
            f"input-gradient pass")
    the_plan = dict(plan(args, calibration, n_train, len(x_test), end - time.perf_counter()), budget_s=budget_s)
    epochs, epoch_s = the_plan['epochs'], the_plan['epoch_seconds_estimate']
    log(f"[plan] {epochs} epochs each (fit: {the_plan['epochs_that_fit']}); estimated epoch "
        f"{epoch_s['edlnet']:.1f}s EDL / {epoch_s['conv_twin']:.1f}s twin")

    later = the_plan['eval_seconds_reserved'] + 2 * the_plan['export_seconds_reserved']
    results: Dict[str, Dict[str, Any]] = {}
    for name, layers in MODELS:  # each model's budget leaves the later parts their estimate
        after = later + (epoch_s['conv_twin'] * epochs if name == 'edlnet' else 0.0)
        budget_min = None if args.epochs else max(end - after - time.perf_counter(), 1.0) / 60.0
        results[name] = train_model(args, name, layers, epochs, out / 'train' / name, budget_min,
                                    the_plan['steps_per_epoch'])
        log(f"[{name}] trained {results[name]['epochs_done']} epochs in {results[name]['train_seconds']:.1f}s"
            f"{' (stopped on the time budget)' if results[name]['stopped'] else ''}; evaluating "
            f"{results[name]['weights']}")
    models = {name: timm.create_model(f"local-dir:{r['weights']}", pretrained=True).float().eval()
              for name, r in results.items()}

    tag = f"{info.name.replace('-', '_')}_fgsm_rs"
    footnote = (f"Fast adversarial training (FGSM-RS, Linf eps {args.eps}, step {args.alpha}, "
                f"recipes/{RECIPE}.yaml), {results['edlnet']['epochs_done']} epochs in a {args.budget_min:g}-minute "
                f"budget on {env.get('gpu') or env['cpu']} (experiments/release_gpu.py"
                f"{', toy size' if args.toy else ''}).")
    reports = {name: {'full': evaluate_model(name, m, x_test, y_test, info, n_total, args, autoattack=False,
                                             footnote=footnote, log=log), 'aa': None} for name, m in models.items()}
    summary: Dict[str, Any] = {
        'schema': 'timm-edl-release/1', 'command': ' '.join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:])),
        'date': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'environment': env, 'recipe': RECIPE, 'settings': vars(args),
        'dataset': {'name': info.name, 'display_name': info.display_name, 'lossy': info.lossy, 'train': n_train,
                    'val_held_out': args.val_n, 'test': len(x_test), 'test_total': n_total},
        'data_seconds': round(data_seconds, 2), 'calibration': calibration, 'plan': the_plan, 'models': {},
        'autoattack_n': 0,
    }

    def write_results(stage: str) -> None:
        """Exports, evaluation JSONs, release.json and (``--pack``) the packed files, as they stand."""
        for name, model in models.items():
            evaluated = [r for r in (reports[name]['full'], reports[name]['aa']) if r is not None]
            folder = export(name, model, evaluated, out, info, tag)
            summary['models'][name] = {**results[name], 'export': str(folder),
                                       'eval_full': summarise(reports[name]['full']),
                                       'eval_autoattack': summarise(reports[name]['aa'])}
            for key, report in (('full', reports[name]['full']), ('autoattack', reports[name]['aa'])):
                if report is not None:
                    (out / f'eval_{name}_{key}.json').write_text(json.dumps(report, indent=2, default=str))
        total = time.perf_counter() - t0
        summary.update(stage=stage, seconds_total=round(total, 1), within_budget=total <= budget_s)
        (out / 'release.json').write_text(json.dumps(summary, indent=2, default=str))
        if args.pack:
            for path in pack(out, Path(args.pack)):
                log(f'packed {path} ({path.stat().st_size / 2**20:.1f} MiB)')

    write_results('pgd evaluated; AutoAttack pending')
    left = end - time.perf_counter() - the_plan['export_seconds_reserved']
    per_point = AA_SAFETY * sum(autoattack_seconds_per_point(r['full'], aa_attacks(args)) for r in reports.values())
    aa_n = min(args.aa_n, len(x_test), max(0, int(left / per_point)) if per_point > 0 else args.aa_n)
    if aa_n < args.aa_n:
        log(f'[eval] AutoAttack on the first {aa_n} points (of {args.aa_n} asked): the {left:.0f}s left hold no '
            f'more at an estimated {per_point:.2f}s per point for both models')
    summary.update(autoattack_n=aa_n, autoattack_seconds_per_point_estimate=round(per_point, 4))
    for name, model in models.items():
        if aa_n > 0:
            reports[name]['aa'] = evaluate_model(name, model, x_test[:aa_n], y_test[:aa_n], info, n_total, args,
                                                 autoattack=True, footnote=footnote, log=log)
    write_results('done')
    log(f"{info.display_name}, Linf eps {args.eps}; FGSM-RS, {epochs} epochs planned")
    _table(summary, aa_n, log)
    log(f"wrote {out / 'release.json'} and {out / 'export'}; {summary['seconds_total']:.0f}s of the "
        f"{budget_s:.0f}s budget")
    return 0


if __name__ == '__main__':
    sys.exit(main())

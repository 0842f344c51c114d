"""The settings of ``paper_claims.py``: scales, datasets, models and regimes, and the jobs they make.

Every training is ``timm-edl train`` on a CPU recipe (``recipes/cpu_*_pgd.yaml``) with the
overrides of :func:`train_spec`; every evaluation is a ``timm-edl eval`` call of
:func:`eval_specs`. :func:`plan` lists them all, each with the job it needs and a rough cost.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _jobs import Job

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything that sets the size of the experiment (recorded in every cached job)."""
    name: str
    datasets: tuple[str, ...]
    seeds: int
    train_n_ex: int              # training images (first n of the non-held-out training split)
    epochs: int                  # adversarial training epochs
    decay_milestones: tuple[int, ...]  # multistep learning-rate decay (x0.1) at these epochs
    elastic_from: int            # two-stage schedule of elastic DL: beta released at this epoch
    natural_epochs: int          # natural training epochs (illusion table)
    batch_size: int
    lr: float
    val_n_ex: int                # held-out training images for per-epoch robust validation
    val_attack_steps: int
    n_test: int                  # first n test points, used by every attack (AutoAttack included)
    pgd_steps: int               # adaptive PGD (step 2.5 eps / steps, 1 restart)
    noise_draws: int             # random noise: draws per point
    aa_attacks: str | None    # None: AutoAttack standard; else version 'custom' with these attacks
    check_n: int                 # points of the PGD ladder and the eps sweep
    grad_points: int
    grad_dirs: int
    naive_modes: tuple[str, ...] = ('truncate', 'bpda', 'one-step')
    # (c) long adversarial runs on a small training set, for robust overfitting (regime 'ro')
    ro_train_n_ex: int = 1000
    ro_epochs: int = 30
    ro_decay_milestones: tuple[int, ...] = (15, 25)


# (c) long runs of the cpu scale: 1000 images, 40 epochs, lr x0.1 at 50 % and 75 % of the run (0-based epochs
# 20 and 30, i.e. from epochs 21 and 31 on; the piecewise schedule of Rice et al. 2020). Sized by measuring: with
# --jobs 2 on 2 idle cores an EDL run takes ~1.6 s (Fashion-MNIST) / ~2.1 s (CIFAR-10-JPEG) per epoch (300-image
# PGD-10 validation included), the conv twin about half; the 18 trainings + 36 evaluations ~12 min wall.
RO_N, RO_EPOCHS, RO_MILESTONES = 1000, 40, (20, 30)
RO_MODELS = ('conv', 'vanilla', 'elastic')

SCALES: dict[str, Scale] = {
    # seconds, for the test: the pipeline end to end, numbers meaningless
    'smoke': Scale(name='smoke', datasets=('fashion-mnist',), seeds=1, train_n_ex=128, epochs=2,
                   decay_milestones=(1,), elastic_from=1, natural_epochs=1, batch_size=64, lr=0.05, val_n_ex=32,
                   val_attack_steps=2, n_test=16, pgd_steps=3, noise_draws=2, aa_attacks='apgd-ce',
                   check_n=16, grad_points=1, grad_dirs=4, ro_train_n_ex=128, ro_epochs=3,
                   ro_decay_milestones=(2,)),
    # about 45 minutes with --jobs 2 on a 2-core CPU (measured: see docs/results.md for the actual time).
    # AutoAttack standard dominates the evaluation cost (APGD-T, FAB-T and Square iterate on every
    # point that survives), hence 100 test points.
    'cpu': Scale(name='cpu', datasets=('fashion-mnist', 'cifar10-jpeg'), seeds=3, train_n_ex=2000, epochs=10,
                 decay_milestones=(5, 8), elastic_from=2, natural_epochs=4, batch_size=64, lr=0.05, val_n_ex=300,
                 val_attack_steps=10, n_test=100, pgd_steps=20, noise_draws=10, aa_attacks=None,
                 check_n=100, grad_points=4, grad_dirs=16, ro_train_n_ex=RO_N, ro_epochs=RO_EPOCHS,
                 ro_decay_milestones=RO_MILESTONES),
}

DATASETS = {
    # sweep: 0, eps/2, eps, 2 eps (the eval adds its large-radius point, 16 eps capped at 0.5)
    'fashion-mnist': {'label': 'Fashion-MNIST', 'recipe': 'recipes/cpu_fashion_mnist_pgd.yaml', 'eps': '0.1',
                      'sweep': '0,0.05,0.1,0.2'},
    'cifar10-jpeg': {'label': 'CIFAR-10-JPEG', 'recipe': 'recipes/cpu_cifar10_jpeg_pgd.yaml', 'eps': '8/255',
                     'sweep': '0,4/255,8/255,16/255'},
}

# model name -> (label, training overrides). beta fixed for a whole run = an EDL layer built with
# beta as a buffer (edl_cfg beta_learnable: false) and no two-stage schedule.
MODELS = {
    'conv': ('conv twin', ['--model-kwargs.edl_layers', 'none']),
    'vanilla': ('vanilla DL (beta = 1)', ['--model-kwargs.edl_cfg', '{beta: 1.0, beta_learnable: false}']),
    'robust': ('robust DL (beta = 0)', ['--model-kwargs.edl_cfg', '{beta: 0.0, beta_learnable: false}']),
    'elastic': ('elastic DL (learned beta)', []),  # two-stage: --elastic-from-epoch set per scale
}
# 'ro': the long adversarial runs of (c) (same recipe as 'at', fewer images, more epochs)
REGIMES = {'natural': ('conv', 'vanilla'), 'at': ('conv', 'vanilla', 'robust', 'elastic'),
           'ro': RO_MODELS}
REGIME_LABELS = {'natural': 'natural', 'at': 'PGD-AT', 'ro': 'PGD-AT long (c)'}
COLORS = {'conv': 'tab:blue', 'vanilla': 'tab:orange', 'robust': 'tab:green', 'elastic': 'tab:red'}
CHECKS = ('ordering', 'eps-sweep', 'pgd-steps-restarts', 'gradient', 'transfer', 'noise-vs-attack',
          'naive-vs-adaptive', 'autoattack-checks')



def _job_dir(out_dir: Path, ds: str, regime: str, model: str, seed: int) -> Path:
    return out_dir / ds / f'{regime}_{model}_s{seed}'


def train_spec(scale: Scale, ds: str, regime: str, model: str, seed: int) -> dict[str, Any]:
    """The training of one model: recipe + overrides (what ``timm-edl train`` gets)."""
    epochs = {'natural': scale.natural_epochs, 'at': scale.epochs, 'ro': scale.ro_epochs}[regime]
    milestones = {'natural': [], 'at': list(scale.decay_milestones), 'ro': list(scale.ro_decay_milestones)}[regime]
    n_ex = scale.ro_train_n_ex if regime == 'ro' else scale.train_n_ex
    overrides = [
        '--train-n-ex', str(n_ex), '--epochs', str(epochs), '--batch-size', str(scale.batch_size),
        '--lr', str(scale.lr), '--sched', 'multistep',
        '--decay-milestones', json.dumps(milestones),
        '--val-every', '1', '--val-split', 'holdout', '--val-n-ex', str(scale.val_n_ex),
        '--val-attack-steps', str(scale.val_attack_steps), '--seed', str(seed), '--num-workers', '0',
        '--progress', 'never', '--save-every-steps', '0', '--keep-checkpoints', '1',
        '--objective', 'natural' if regime == 'natural' else 'pgd',
        '--elastic-from-epoch', str(scale.elastic_from) if model == 'elastic' else 'null',
    ] + MODELS[model][1]
    return {'kind': 'train', 'dataset': ds, 'regime': regime, 'model': model, 'seed': seed,
            'recipe': DATASETS[ds]['recipe'], 'overrides': overrides, 'cache_version': CACHE_VERSION}


def eval_specs(scale: Scale, ds: str, regime: str, model: str, seed: int) -> list[dict[str, Any]]:
    """The ``timm-edl eval`` calls of one trained model (each a list of CLI arguments).

    * final weights: clean, random noise, adaptive PGD, AutoAttack, the naive attack
      (truncate), the eps sweep and every gradient-masking check; the transfer check from the
      conv twin built from the model's own dictionaries (EDL models only);
    * natural training: one extra naive-only call per other naive mode;
    * adversarial conv / elastic: the best-validation checkpoint with noise + PGD + checks
      (no AutoAttack), for the robust-overfitting table;
    * long runs of (c) (regime 'ro'): final and best-validation weights, each with noise + PGD +
      checks (no AutoAttack, no naive attack).
    """
    eps = DATASETS[ds]['eps']
    sweep = DATASETS[ds]['sweep']
    common = ['--dataset', ds, '--threat-model', 'Linf', '--eps', eps, '--n-ex', str(scale.n_test),
              '--batch-size', str(scale.n_test), '--seed', str(seed), '--device', 'cpu', '--no-progress',
              '--overwrite']
    checks = ['--check-n', str(min(scale.check_n, scale.n_test)), '--grad-points', str(scale.grad_points),
              '--grad-dirs', str(scale.grad_dirs), '--eps-sweep', sweep]
    aa = ['--aa-attacks', scale.aa_attacks] if scale.aa_attacks else ['--version', 'standard']
    surrogate = [] if model == 'conv' else ['--surrogate', 'twin']
    light = (['--attacks', 'noise,pgd', '--pgd-steps', str(scale.pgd_steps), '--noise-draws',
              str(scale.noise_draws)] + checks + surrogate + common)
    if regime == 'ro':
        return [{'name': 'final', 'weights': 'final', 'argv': light},
                {'name': 'best', 'weights': 'best', 'argv': light}]
    main = (['--attacks', 'noise,pgd,autoattack', '--pgd-steps', str(scale.pgd_steps), '--noise-draws',
             str(scale.noise_draws), '--naive', '--naive-mode', scale.naive_modes[0]]
            + aa + checks + surrogate + common)
    specs = [{'name': 'final', 'weights': 'final', 'argv': main}]
    if regime == 'natural':
        for mode in scale.naive_modes[1:]:
            specs.append({'name': f'naive-{mode}', 'weights': 'final',
                          'argv': ['--attacks', 'clean', '--pgd-steps', str(scale.pgd_steps), '--naive',
                                   '--naive-mode', mode, '--no-checks'] + common})
    if regime == 'at' and model in ('conv', 'elastic'):
        specs.append({'name': 'best', 'weights': 'best', 'argv': light})
    return specs


def plan(scale: Scale, seeds: int, out_dir: Path, datasets: Sequence[str]) -> list[Job]:
    """Every job of the experiment, with its dependency and a rough cost for ordering."""
    jobs: list[Job] = []
    for ds in datasets:
        ds_cost = 1.5 if ds == 'cifar10-jpeg' else 1.0
        for seed in range(seeds):
            for regime, models in REGIMES.items():
                for model in models:
                    d = _job_dir(out_dir, ds, regime, model, seed)
                    edl = 0.3 if model == 'conv' else 1.0
                    epochs = {'natural': scale.natural_epochs, 'at': scale.epochs, 'ro': scale.ro_epochs}[regime]
                    per_epoch = {'natural': 0.35, 'at': 1.0,
                                 'ro': 0.4 + 0.6 * scale.ro_train_n_ex / scale.train_n_ex}[regime]
                    tkey = f'{ds}/{regime}/{model}/s{seed}/train'
                    jobs.append(Job(tkey, 'train', d, train_spec(scale, ds, regime, model, seed), d / 'train.json',
                                    ds_cost * edl * epochs * per_epoch))
                    for es in eval_specs(scale, ds, regime, model, seed):
                        spec = {'kind': 'eval', 'cache_version': CACHE_VERSION, **es}
                        aa_cost = 6.0 if (es['name'] == 'final' and regime == 'at') else 2.0
                        cost = ds_cost * edl * (aa_cost if es['name'] == 'final' and regime != 'ro' else 0.5)
                        jobs.append(Job(f"{ds}/{regime}/{model}/s{seed}/eval_{es['name']}", 'eval', d, spec,
                                        d / f"eval_{es['name']}.json", cost, after=tkey))
    return jobs

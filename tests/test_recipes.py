"""Every recipe parses, names a registered model and uses only keys its target script accepts.

* ``recipes/*.yaml``: ``timm-edl train`` recipes, checked against our schema
  (:class:`timm_edl.train.TrainConfig`), and their models are built (on the meta device, so
  even WRN-34-10 costs nothing) with the recipe's ``model_kwargs``.
* ``recipes/timm/*.yaml``: configs for timm's own ``train.py`` (natural training), checked
  against :data:`TIMM_TRAIN_PY_ARGS`.
"""
import re
from pathlib import Path

import pytest
import torch
import yaml

import timm
import timm_edl  # noqa: F401  (registers edlnet_*)
from timm.models._registry import split_model_name_tag
from timm_edl import data as D
from timm_edl.layers.edl import edl_layers
from timm_edl.train import load_config
from timm_edl.train.config import config_to_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / 'recipes').glob('*.yaml'))
TIMM_RECIPES = sorted((ROOT / 'recipes' / 'timm').glob('*.yaml'))

# Argument names (argparse dests, i.e. the YAML keys) of timm's train.py at timm 1.0.31
# (pytorch-image-models/train.py; the script is not in the timm wheel, so this list was
# transcribed from its argument documentation and cannot be re-checked offline). Update it
# when the recipes target a newer timm.
TIMM_TRAIN_PY_ARGS = frozenset({
    # dataset
    'data', 'data_dir', 'dataset', 'train_split', 'val_split', 'train_num_samples', 'val_num_samples',
    'dataset_download', 'class_map', 'input_img_mode', 'input_key', 'target_key',
    'dataset_trust_remote_code',
    # model
    'model', 'pretrained', 'pretrained_path', 'initial_checkpoint', 'resume', 'no_resume_opt',
    'num_classes', 'gp', 'img_size', 'in_chans', 'input_size', 'crop_pct', 'mean', 'std', 'interpolation',
    'batch_size', 'validation_batch_size', 'channels_last', 'fuser', 'grad_accum_steps',
    'grad_checkpointing', 'fast_norm', 'model_kwargs', 'head_init_scale', 'head_init_bias',
    'torchscript', 'torchcompile', 'torchcompile_mode',
    # device & distributed
    'device', 'amp', 'amp_dtype', 'amp_impl', 'model_dtype', 'no_ddp_bb', 'synchronize_step', 'local_rank',
    'device_modules',
    # optimizer
    'opt', 'opt_eps', 'opt_betas', 'momentum', 'weight_decay', 'clip_grad', 'clip_mode', 'layer_decay',
    'opt_kwargs',
    # learning-rate schedule
    'sched', 'sched_on_updates', 'lr', 'lr_base', 'lr_base_size', 'lr_base_scale', 'lr_noise',
    'lr_noise_pct', 'lr_noise_std', 'lr_cycle_mul', 'lr_cycle_decay', 'lr_cycle_limit', 'lr_k_decay',
    'warmup_lr', 'min_lr', 'epochs', 'epoch_repeats', 'start_epoch', 'decay_milestones', 'decay_epochs',
    'warmup_epochs', 'warmup_prefix', 'cooldown_epochs', 'patience_epochs', 'decay_rate',
    # augmentation & regularisation
    'no_aug', 'train_crop_mode', 'scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'color_jitter_prob',
    'grayscale_prob', 'gaussian_blur_prob', 'aa', 'aug_repeats', 'aug_splits', 'jsd_loss', 'bce_loss',
    'bce_sum', 'bce_target_thresh', 'bce_pos_weight', 'reprob', 'remode', 'recount', 'resplit', 'mixup',
    'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'mixup_off_epoch',
    'smoothing', 'train_interpolation', 'drop', 'drop_connect', 'drop_path', 'drop_block',
    # batch norm
    'bn_momentum', 'bn_eps', 'sync_bn', 'dist_bn', 'split_bn',
    # model EMA
    'model_ema', 'model_ema_force_cpu', 'model_ema_decay', 'model_ema_warmup',
    # misc
    'seed', 'worker_seeding', 'log_interval', 'recovery_interval', 'checkpoint_hist', 'workers',
    'save_images', 'pin_mem', 'no_prefetcher', 'output', 'experiment', 'eval_metric', 'tta',
    'use_multi_epochs_loader', 'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id',
})

# the zoo's recipes (make zoo) train on 2 CPU cores on Fashion-MNIST / CIFAR-10-JPEG by design
ZOO_RECIPES = ('edlnet_resnet8_in_fashion_mnist_pgd', 'edlnet_resnet8_in_cifar10_jpeg_pgd',
               'edlnet_resnet20_cifar10_jpeg_fast', 'edlnet_resnet8_in_cifar10_jpeg_smooth')
GPU_RECIPES = [p for p in RECIPES if not p.stem.startswith('cpu_') and p.stem not in ZOO_RECIPES]


def _build_on_meta(model_name, model_kwargs, num_classes=10, in_chans=3):
    with torch.device('meta'):
        return timm.create_model(model_name, num_classes=num_classes, in_chans=in_chans, **model_kwargs)


def test_there_are_recipes():
    names = {p.stem for p in RECIPES}
    for needed in ('edlnet_resnet18_cifar10_pgd', 'edlnet_resnet18_cifar10_trades', 'edlnet_resnet18_cifar10_fast',
                   'edlnet_resnet18_cifar100_pgd', 'edlnet_resnet18_in_tinyimagenet_pgd',
                   'edlnet_wrn28_10_cifar10_pgd', 'edlnet_wrn34_10_cifar10_trades',
                   'edlnet_resnet18_cifar10_convert_finetune', 'edlnet_resnet8_in_imagefolder_finetune',
                   'edlnet_resnet8_in_fashion_mnist_pgd', 'edlnet_resnet8_in_cifar10_jpeg_pgd',
                   'cpu_fashion_mnist_pgd', 'cpu_cifar10_jpeg_pgd', 'edlnet_resnet18_cifar10_pgd_awp',
                   'edlnet_resnet18_cifar10_trades_awp', 'resnet18_conv_cifar10_pgd_awp',
                   'resnet18_conv_cifar10_trades_awp'):
        assert needed in names, needed
    assert TIMM_RECIPES


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_builds(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)  # our schema: unknown keys and bad values raise ConfigError
    assert set(raw) <= set(config_to_dict(cfg))
    arch = split_model_name_tag(cfg.model)[0]
    assert timm.is_model(arch), cfg.model
    info = D.DATASETS[cfg.dataset]  # canonical dataset names only
    model = _build_on_meta(cfg.model, cfg.model_kwargs, num_classes=info.num_classes or 10,
                           in_chans=info.in_chans)
    assert set(model.pretrained_cfg['mean']) == {0.0} and set(model.pretrained_cfg['std']) == {1.0}  # [0, 1] pixels
    if cfg.convert is None and cfg.model_kwargs.get('edl_layers') != 'none':
        assert edl_layers(model), f'{path.stem}: an EDL recipe without EDL layers'
    if cfg.elastic_from_epoch is not None:
        assert cfg.elastic_from_epoch < cfg.epochs


@pytest.mark.parametrize('path', GPU_RECIPES, ids=lambda p: p.stem)
def test_user_facing_recipes_default_to_real_datasets(path):
    cfg = load_config(path)
    expected = next((d for key, d in (('cifar100', 'cifar100'), ('tinyimagenet', 'tiny-imagenet'),
                                      ('imagefolder', 'imagefolder')) if key in path.stem), 'cifar10')
    assert cfg.dataset == expected, path.stem  # the real CIFAR-10 unless the recipe is about another set
    assert not cfg.download  # downloading only when asked on the command line
    assert cfg.val_n_ex > 0 and cfg.val_every >= 1  # robust validation + best-robust selection


def test_paper_scale_recipes_use_the_two_stage_schedule():
    for path in GPU_RECIPES:
        cfg = load_config(path)
        if cfg.epochs == 200:
            assert cfg.elastic_from_epoch == 150, path.stem
            assert (cfg.opt, cfg.lr, cfg.momentum) == ('sgd', 0.1, 0.9), path.stem
            assert cfg.eps == pytest.approx(8 / 255) and cfg.attack_step_size in (None, pytest.approx(2 / 255))


def test_awp_recipes_perturb_weights_with_the_published_settings():
    """AWP (Wu et al. 2020): PGD-AT with gamma 0.01 and no warm-up, TRADES with gamma 0.005 after
    10 epochs (the AWP authors' CIFAR-10 settings); every other key as in the recipe without AWP."""
    awp = [p for p in RECIPES if p.stem.endswith('_awp')]
    assert len(awp) == 4
    for path in awp:
        cfg = config_to_dict(load_config(path))
        expected = {'pgd': (0.01, 0), 'trades': (0.005, 10)}[cfg['objective']]
        assert (cfg['awp_gamma'], cfg['awp_warmup']) == expected, path.stem
        plain = config_to_dict(load_config(path.with_name(path.stem[:-len('_awp')] + '.yaml')))
        for d in (cfg, plain):
            for key in ('output', 'awp_gamma', 'awp_warmup'):
                d.pop(key)
        assert cfg == plain, path.stem


def test_smoothing_recipe_is_the_zoo_recipe_trained_on_gaussian_noise():
    """Cohen et al.'s recipe (natural training on x + N(0, 0.25^2 I)) on the zoo's CIFAR-10-JPEG
    network: model, data, optimiser and seed as in the PGD recipe; best/ on the hold-out's noisy accuracy."""
    smooth = config_to_dict(load_config(ROOT / 'recipes' / 'edlnet_resnet8_in_cifar10_jpeg_smooth.yaml'))
    pgd = config_to_dict(load_config(ROOT / 'recipes' / 'edlnet_resnet8_in_cifar10_jpeg_pgd.yaml'))
    assert (smooth['objective'], smooth['sigma'], smooth['val_select']) == ('natural', 0.25, 'noisy')
    assert (smooth['val_split'], smooth['val_n_ex']) == ('holdout', 1000)
    differ = {'output', 'objective', 'sigma', 'val_select', 'val_split', 'epochs', 'attack_steps', 'attack_step_size'}
    for key in set(smooth) - differ:
        assert smooth[key] == pgd[key], key


@pytest.mark.parametrize('path', [p for p in RECIPES if '_conv_' in p.stem], ids=lambda p: p.stem)
def test_conv_twins_differ_from_their_edl_recipe_only_in_edl_layers(path):
    edl_path = path.with_name('edlnet_' + path.stem.replace('_conv', '') + '.yaml')
    assert edl_path.is_file(), f'{path.name} has no EDL counterpart {edl_path.name}'
    twin, edl = config_to_dict(load_config(path)), config_to_dict(load_config(edl_path))
    assert twin['model_kwargs'].pop('edl_layers') == 'none'
    for d in (twin, edl):
        d.pop('output')
    assert twin == edl


@pytest.mark.parametrize('path', TIMM_RECIPES, ids=lambda p: p.stem)
def test_timm_train_py_configs(path):
    cfg = yaml.safe_load(path.read_text())
    unknown = set(cfg) - TIMM_TRAIN_PY_ARGS
    assert not unknown, f'{path.name}: keys timm train.py does not accept: {sorted(unknown)}'
    assert 'timm_edl' in cfg['device_modules']  # imported by train.py: registers edlnet_*
    assert timm.is_model(cfg['model'])
    model = _build_on_meta(cfg['model'], cfg.get('model_kwargs') or {}, num_classes=cfg.get('num_classes', 10))
    assert model.pretrained_cfg['mean'] == (0.0, 0.0, 0.0) and model.pretrained_cfg['std'] == (1.0, 1.0, 1.0)
    assert cfg['dataset'].startswith('torch/') or cfg['dataset'] == ''


def test_docs_name_existing_recipes():
    doc = (ROOT / 'docs' / 'training.md').read_text()
    named = set(re.findall(r'recipes/[\w/]+\.yaml', doc))
    assert named
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing

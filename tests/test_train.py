"""Tests of ``timm-edl train`` (timm_edl.train): config schema, objectives, the accelerate
loop (state, summary, exports), the two-stage beta schedule, exact resumption, DDP with two
CPU processes, and the user-facing errors.

Every run uses a tiny EDLNet (a few thousand parameters, ImageNet stem so 28x28 inputs
shrink to 7x7 at once) on the embedded Fashion-MNIST subset, so nothing is downloaded.
"""
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import timm
import timm_edl  # noqa: F401  (registers edlnet_*)
from timm_edl.cli.train import main
from timm_edl.layers.edl import edl_layers, set_beta_mode
from timm_edl.train import ConfigError, TrainConfig, load_config, train
from timm_edl.train.config import config_keys
from timm_edl.train.objectives import craft, crafting_mode, training_loss
from timm_edl.train.trainer import param_groups

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_KWARGS = "{stem_type: imagenet, layers: [1, 1], widths: [8, 16], stem_width: 8}"
STEPS_PER_EPOCH = 4  # train_n_ex 128 / batch 32


def tiny_args(output, **overrides):
    """CLI arguments of a tiny two-epoch PGD run (4 optimizer steps per epoch)."""
    values = {
        'dataset': 'fashion-mnist-small', 'model': 'edlnet_resnet18', 'model-kwargs': TINY_KWARGS,
        'epochs': 2, 'batch-size': 32, 'train-n-ex': 128, 'val-n-ex': 32, 'attack-steps': 2,
        'val-attack-steps': 2, 'num-workers': 0, 'sched': 'cosine', 'lr': 0.05, 'progress': 'never',
        'output': str(output),
    }
    values.update({k.replace('_', '-'): v for k, v in overrides.items()})
    args = []
    for key, value in values.items():
        args += [f'--{key}', str(value)]
    return args


def tiny_config(output, **overrides):
    args = tiny_args(output, **overrides)
    return load_config(None, args)


def tiny_model(**kwargs):
    return timm.create_model('edlnet_resnet18', num_classes=10, in_chans=1, stem_type='imagenet',
                             layers=(1, 1), widths=(8, 16), stem_width=8, **kwargs)


def read_summary(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def betas(state):
    return {k: float(v) for k, v in state.items() if k.endswith('.beta')}


# --------------------------------------------------------------------------- config


def test_config_defaults_recipe_and_overrides(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('model: edlnet_resnet18\nepochs: 3\neps: 8/255\nmodel_kwargs: {widths: [8, 16]}\n')
    cfg = load_config(recipe, ['--epochs', '2', '--model-kwargs.edl_layers', 'none', '--decay-milestones',
                               '[1, 2]', '--val-eps=4/255', '--augment', '--elastic-from-epoch', 'null'])
    assert cfg.epochs == 2
    assert cfg.eps == pytest.approx(8 / 255) and cfg.val_eps == pytest.approx(4 / 255)
    assert cfg.model_kwargs == {'widths': [8, 16], 'edl_layers': 'none'}
    assert cfg.decay_milestones == [1, 2] and cfg.augment is True and cfg.elastic_from_epoch is None
    assert cfg.output == str(Path('runs') / 'r')
    assert cfg.dataset == 'cifar10'  # the default dataset is the real CIFAR-10
    assert set(config_keys()) == set(TrainConfig.__dataclass_fields__)


@pytest.mark.parametrize('text, message', [
    ('epoch: 3\n', "unknown config key 'epoch'.*Did you mean 'epochs'"),
    ('epochs: two\n', 'epochs: expected an integer'),
    ('objective: awp\n', "objective: 'awp' is not one of"),
    ('eps: 8/0\n', 'eps: expected a number'),
    ('model_kwargs: {num_classes: 5}\n', 'num_classes is set from the dataset'),
    ('- a list\n', 'must be a YAML mapping'),
    ('compile_mode: default\n', 'compile_mode is set but compile is false'),
    ('compile: true\ncompile_backend: fast\n', "compile_backend: 'fast' is not one of"),
    ('compile: true\ncompile_mode: quick\n', "compile_mode: 'quick' is not one of"),
    ('time_budget_min: 0\n', 'time_budget_min must be > 0'),
    ('warmup_prefix: true\nwarmup_epochs: 5\nepochs: 5\n', 'warmup_epochs .5. must be fewer than epochs'),
    ('data_on_device: true\nimage_size: 32\n', 'data_on_device serves the stored images'),
    ('warmup_epochs: 1\nwarmup_lr: 0.0\nsched_on_updates: false\n',
     'trains the whole first epoch at learning rate 0.*sched_on_updates: true'),
    ('warmup_epochs: 1\nwarmup_lr: 0\n', 'trains the whole first epoch at learning rate 0'),
])
def test_config_errors_are_clear(tmp_path, text, message):
    recipe = tmp_path / 'bad.yaml'
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(recipe)


def test_fast_at_schedules_per_update_and_warms_up_from_zero_within_the_first_epoch(tmp_path):
    """FGSM-RS defaults to a per-update schedule (other objectives to per-epoch), so a warm-up
    from 0 leaves 0 after the first update; timm's own scheduler gives the reference values."""
    from timm.scheduler import create_scheduler_v2
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('objective: fast\nwarmup_epochs: 1\nwarmup_lr: 0\nsched: cosine\nepochs: 2\n')
    cfg = load_config(recipe)
    assert cfg.sched_on_updates is True
    assert load_config(recipe, ['--objective', 'pgd', '--warmup-lr', '1e-5']).sched_on_updates is False
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=2, warmup_epochs=1, warmup_lr=0.0,
                                   step_on_epochs=False, updates_per_epoch=10)
    sched.step_update(num_updates=5)  # halfway through the first epoch
    assert 0 < opt.param_groups[0]['lr'] < cfg.lr


def test_unknown_key_on_the_command_line_is_rejected(tmp_path, capsys):
    assert main(tiny_args(tmp_path / 'run') + ['--learning-rate', '0.1']) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rate'" in err and 'Valid keys' in err
    assert not (tmp_path / 'run').exists()


# --------------------------------------------------------------------------- objectives


def test_param_groups_keep_frozen_beta_without_weight_decay():
    model = set_beta_mode(tiny_model(), 'vanilla')
    groups = param_groups(model, 5e-4)
    ids = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    assert all(id(p) in ids for p in model.parameters())  # frozen beta included
    for _, layer in edl_layers(model):
        assert not layer.beta.requires_grad and ids[id(layer.beta)] == 0.0
        assert ids[id(layer.weight)] == 5e-4


@pytest.mark.parametrize('craft_bn', ['eval', 'train'])
def test_crafting_leaves_bn_statistics_and_mode_alone(craft_bn):
    torch.manual_seed(0)
    model = tiny_model().train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k or 'num_batches' in k}
    x_adv = craft('pgd', model, x, y, eps=0.1, norm='Linf', steps=2, step_size=0.05, fast_alpha=None,
                  craft_bn=craft_bn)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with crafting_mode(model, craft_bn):
        assert model.training == (craft_bn == 'train')


@pytest.mark.parametrize('objective', ['natural', 'pgd', 'fast', 'trades', 'mart'])
def test_objectives_give_finite_losses_and_gradients(objective):
    torch.manual_seed(0)
    model = tiny_model().train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    gen = torch.Generator().manual_seed(0)
    x_adv = craft(objective, model, x, y, eps=0.1, norm='Linf', steps=2, step_size=0.05, fast_alpha=None,
                  craft_bn='eval', generator=gen)
    loss, logits = training_loss(objective, model, x, x_adv, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.fc.weight.grad is not None
    assert (logits['adv'] is None) == (objective == 'natural')


def test_trades_and_mart_reduce_to_their_clean_terms_without_perturbation():
    torch.manual_seed(0)
    model = tiny_model().eval()  # eval: the two forwards see the same BN statistics
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(model(x), y)
    trades, _ = training_loss('trades', model, x, x, y, trades_beta=6.0)
    assert trades.item() == pytest.approx(ce.item(), abs=1e-5)  # KL(p(x) || p(x)) = 0
    mart, _ = training_loss('mart', model, x, x, y, mart_beta=6.0)
    probs = model(x).softmax(1)
    wrong = probs.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), -1).max(1).values
    assert mart.item() == pytest.approx((ce - torch.log(1 - wrong).mean()).item(), abs=1e-5)


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
    """An uninterrupted two-epoch run with EMA, the two-stage switch at epoch 1 and a state
    saved after every optimizer step (shared by several tests)."""
    out = tmp_path_factory.mktemp('reference') / 'run'
    args = tiny_args(out, elastic_from_epoch=1, model_ema='true', save_every_steps=1, keep_checkpoints=100)
    assert main(args) == 0
    return out


def test_run_writes_state_summary_and_hub_exports(reference_run):
    out = reference_run
    steps = sorted(p.name for p in (out / 'checkpoints').iterdir())
    assert steps == [f'step_{i:09d}' for i in range(1, 2 * STEPS_PER_EPOCH + 1)]
    last = out / 'checkpoints' / steps[-1]
    for name in ('model.safetensors', 'optimizer.bin', 'progress.json', 'random_states_0.pkl'):
        assert (last / name).is_file(), name
    assert json.loads((last / 'progress.json').read_text())['global_update'] == 2 * STEPS_PER_EPOCH
    rows = read_summary(out / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1']
    for key in ('train_loss', 'train_clean_top1', 'train_robust_top1', 'train_robust_loss', 'train_beta_mean',
                'train_beta_stem', 'train_beta_layer1', 'train_stage', 'train_epoch_time', 'eval_clean_top1',
                'eval_robust_top1', 'eval_ema_robust_top1', 'lr'):
        assert rows[-1][key] != '', key
    assert [r['train_stage'] for r in rows] == ['vanilla', 'elastic']
    assert (out / 'config.yaml').is_file() and (out / 'log.txt').is_file()
    for export in ('final', 'best'):
        folder = out / export
        assert (folder / 'model.safetensors').is_file() and (folder / 'config.json').is_file()
        model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        assert model.num_classes == 10 and model.in_chans == 1
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    config = json.loads((out / 'final' / 'config.json').read_text())
    assert config['label_names'][0] == 'T-shirt/top'  # the dataset's classes, not CIFAR's
    log = (out / 'log.txt').read_text().splitlines()
    assert [line.split(' [')[0] for line in log if line.startswith('epoch ') and '/2 [' in line] == \
        ['epoch 1/2', 'epoch 2/2']  # one line per epoch in non-TTY logs


def test_two_stage_schedule_freezes_then_releases_beta(reference_run):
    ckpts = reference_run / 'checkpoints'
    states = [load_file(str(ckpts / f'step_{i:09d}' / 'model.safetensors'))
              for i in range(1, 2 * STEPS_PER_EPOCH + 1)]
    assert len(betas(states[0])) == 5
    for state in states[:STEPS_PER_EPOCH]:  # vanilla DL: beta exactly 1 while the weights train
        assert all(v == 1.0 for v in betas(state).values())
    assert not torch.equal(states[0]['conv1.weight'], states[STEPS_PER_EPOCH - 1]['conv1.weight'])
    moved = [k for k, v in betas(states[-1]).items() if v != 1.0]
    assert len(moved) == 5  # elastic: every layer's beta was trained
    first_elastic = betas(states[STEPS_PER_EPOCH])
    assert any(v != 1.0 for v in first_elastic.values())



@pytest.mark.parametrize('beta, objective', [(0.0, 'pgd'), (1.0, 'natural')])
def test_beta_fixed_for_the_whole_run(tmp_path, beta, objective):
    """Robust DL (beta = 0) and vanilla DL (beta = 1) for a whole run: EDL layers built with a
    fixed beta (edl_cfg beta_learnable: false) and no two-stage schedule; the exports keep it."""
    kwargs = TINY_KWARGS[:-1] + f", edl_cfg: {{beta: {beta}, beta_learnable: false}}}}"
    out = tmp_path / 'run'
    cfg = tiny_config(out, model_kwargs=kwargs, objective=objective, epochs=1, elastic_from_epoch='null')
    result = train(cfg)
    layers = edl_layers(result.model)
    assert len(layers) == 5 and all(float(layer.beta) == beta for _, layer in layers)
    assert all(not isinstance(layer.beta, torch.nn.Parameter) for _, layer in layers)  # a buffer: never trained
    rows = read_summary(out / 'summary.csv')
    assert [float(r['train_beta_mean']) for r in rows] == [beta]
    for export in ('final', 'best'):
        assert all(v == beta for v in betas(load_file(str(out / export / 'model.safetensors'))).values())
        reloaded = timm.create_model(f'local-dir:{out / export}', pretrained=True)
        assert all(float(layer.beta) == beta for _, layer in edl_layers(reloaded))


def _compare_runs(a, b):
    for export in ('final', 'best'):
        sa, sb = load_file(str(a / export / 'model.safetensors')), load_file(str(b / export / 'model.safetensors'))
        assert sa.keys() == sb.keys()
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not bad, f'{export}: {bad[:5]}'
    ra = read_summary(a / 'summary.csv')
    rb = read_summary(b / 'summary.csv')
    strip = lambda rows: [{k: v for k, v in r.items() if k != 'train_epoch_time'} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)


@pytest.mark.parametrize('kill_after, resumes_from', [(7, 6), (5, 4)])
def test_killed_and_resumed_run_matches_uninterrupted_run(reference_run, tmp_path, kill_after, resumes_from):
    """(7, 6): resumed mid-epoch in the elastic stage; (5, 4): resumed from the end-of-epoch
    state, before its validation."""
    out = tmp_path / 'run'
    args = tiny_args(out, elastic_from_epoch=1, model_ema='true', save_every_steps=3)
    assert main(args + ['--stop-after-steps', str(kill_after)]) == 1  # "killed": nothing saved at the kill
    latest = max((out / 'checkpoints').iterdir())
    assert latest.name == f'step_{resumes_from:09d}'
    assert main(['--resume', '--output', str(out)]) == 0
    _compare_runs(reference_run, out)
    final = load_file(str(out / 'checkpoints' / f'step_{2 * STEPS_PER_EPOCH:09d}' / 'model.safetensors'))
    ref = load_file(str(reference_run / 'checkpoints' / f'step_{2 * STEPS_PER_EPOCH:09d}' / 'model.safetensors'))
    assert all(torch.equal(final[k], ref[k]) for k in ref)


def test_resume_refuses_a_changed_recipe_and_a_missing_state(tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(tiny_args(out, epochs=1, train_n_ex=64, stop_after_steps=1, save_every_steps=1)) == 1
    assert main(tiny_args(out, epochs=1, train_n_ex=64, lr=0.2) + ['--resume']) == 2
    assert 'lr: 0.05 -> 0.2' in capsys.readouterr().err
    assert main(tiny_args(tmp_path / 'fresh') + ['--resume']) == 2  # no recipe given, no run folder
    assert 'fresh/config.yaml not found' in capsys.readouterr().err
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump({'dataset': 'fashion-mnist-small', 'output': str(tmp_path / 'fresh')}))
    assert main(['--config', str(recipe), '--resume']) == 2
    assert 'no complete checkpoint' in capsys.readouterr().err


def test_output_folder_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / 'run'
    args = tiny_args(out, epochs=1, train_n_ex=64, val_n_ex=0)
    assert main(args) == 0
    marker = out / 'final' / 'model.safetensors'
    stamp = marker.stat().st_mtime_ns
    assert main(args) == 2
    err = capsys.readouterr().err
    assert 'already exists' in err and '--overwrite' in err and '--resume' in err
    assert marker.stat().st_mtime_ns == stamp
    assert main(args + ['--overwrite']) == 0
    foreign = tmp_path / 'mine'
    foreign.mkdir()
    (foreign / 'thesis.tex').write_text('precious')
    assert main(tiny_args(foreign, epochs=1, train_n_ex=64) + ['--overwrite']) == 2
    assert 'does not look like a timm-edl run folder' in capsys.readouterr().err
    assert (foreign / 'thesis.tex').read_text() == 'precious'


def test_missing_dataset_gives_a_clear_error(tmp_path, capsys):
    args = tiny_args(tmp_path / 'run', dataset='cifar10', data_dir=tmp_path / 'nowhere')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert 'CIFAR-10 (train split) not found' in err and '--download' in err
    assert 'Traceback' not in err


def test_pretrained_tag_without_published_weights_is_a_clear_error(tmp_path, capsys):
    args = tiny_args(tmp_path / 'run', model='edlnet_resnet18.cifar10', pretrained='true')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert 'no pretrained weights are published' in err and 'Traceback' not in err
    assert not (tmp_path / 'run').exists()  # nothing half-made is left behind


def test_finetune_from_a_converted_conv_checkpoint(tmp_path):
    """A conv-twin checkpoint (safetensors) -> convert_to_edl -> fine-tune -> an export that
    timm rebuilds as an EDLNet."""
    from safetensors.torch import save_file
    conv = tiny_model(edl_layers='none')
    assert not edl_layers(conv)
    ckpt = tmp_path / 'conv.safetensors'
    save_file(conv.state_dict(), str(ckpt))
    out = tmp_path / 'run'
    args = tiny_args(out, epochs=1, train_n_ex=64, checkpoint=ckpt, convert='default', elastic_from_epoch=0)
    args += ['--model-kwargs.edl_layers', 'none']  # a dotted override adds to model_kwargs
    assert main(args) == 0
    model = timm.create_model(f'local-dir:{out / "final"}', pretrained=True)
    layers = edl_layers(model)
    assert len(layers) == 5
    assert any(float(layer.beta.detach()) != 1.0 for _, layer in layers)  # elastic from epoch 0
    log = (out / 'log.txt').read_text()
    assert f'loaded weights from {ckpt}' in log and 'converted 5 convolutions' in log


def test_initial_weights_refuse_pickles_and_reinitialise_another_head(tmp_path, capsys):
    """A torch.save checkpoint is refused as everywhere in the package (UnsafeCheckpointError, a
    one-line error from the CLI) unless allow_pickle; a head for another number of classes is
    left as built, every other weight is loaded."""
    from timm_edl.hub import UnsafeCheckpointError
    from timm_edl.train.model import load_initial_weights
    torch.manual_seed(0)
    source = timm.create_model('edlnet_resnet18', num_classes=5, in_chans=1, stem_type='imagenet', layers=(1, 1),
                               widths=(8, 16), stem_width=8)
    pth = tmp_path / 'five_classes.pth'
    torch.save({'state_dict': {f'module.{k}': v for k, v in source.state_dict().items()}}, pth)
    model = tiny_model()
    head = model.fc.weight.detach().clone()
    with pytest.raises(UnsafeCheckpointError, match='allow_pickle'):
        load_initial_weights(model, str(pth))
    assert main(tiny_args(tmp_path / 'run', checkpoint=pth)) == 2
    err = capsys.readouterr().err
    assert 'refusing to load' in err and 'Traceback' not in err
    assert not (tmp_path / 'run').exists()
    messages = []
    load_initial_weights(model, str(pth), allow_pickle=True, log=messages.append)
    assert torch.equal(model.fc.weight, head)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert 'fc.weight, fc.bias re-initialised' in messages[0]


def test_mixed_precision_and_accumulation_run(tmp_path):
    cfg = tiny_config(tmp_path / 'run', epochs=1, train_n_ex=128, mixed_precision='bf16', grad_accum_steps=2,
                      clip_grad=1.0, objective='trades')
    result = train(cfg)
    assert result.completed and result.global_update == STEPS_PER_EPOCH // 2
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


# --------------------------------------------------------------------------- DDP

_WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    from timm_edl.train import load_config, train
    from accelerate import PartialState
    cfg = load_config(None, sys.argv[2:])
    result = train(cfg)
    state = PartialState()
    torch.save({
        'num_processes': state.num_processes,
        'state': {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        'seen': result.seen_indices,
    }, os.path.join(sys.argv[1], f'rank{state.process_index}.pt'))
''')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch_two_cpu_ranks(tmp_path: Path, args: list) -> list:
    """Train with `accelerate launch` on 2 CPU processes (gloo); the dicts each rank saved."""
    worker = tmp_path / 'worker.py'
    worker.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(_free_port()), str(worker), str(tmp_path)] + args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in (0, 1)]


def test_two_cpu_processes_train_data_parallel(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): the ranks see disjoint shards of every
    epoch and end with identical weights, including the betas released after wrapping."""
    out = tmp_path / 'run'
    ranks = launch_two_cpu_ranks(tmp_path, tiny_args(out, batch_size=16, objective='trades', elastic_from_epoch=1,
                                                     train_n_ex=128))
    assert all(r['num_processes'] == 2 for r in ranks)
    s0, s1 = ranks[0]['state'], ranks[1]['state']
    assert not [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert all(v != 1.0 for v in betas(s0).values())  # beta trained, identically on both ranks
    # 128 training images, global batch 32: each rank sees 64 per epoch, disjoint, together all
    for epoch in range(2):
        seen = [set(r['seen'][epoch * 64:(epoch + 1) * 64].tolist()) for r in ranks]
        assert len(seen[0]) == len(seen[1]) == 64 and not seen[0] & seen[1]
        if epoch == 0:
            union = seen[0] | seen[1]
        assert seen[0] | seen[1] == union
    assert len(union) == 128
    rows = read_summary(out / 'summary.csv')
    assert len(rows) == 2 and 'global batch 32' in (out / 'log.txt').read_text()


# --------------------------------------------------------------------------- speed keys, budget, best epoch


def test_warmup_prefix_poly_is_the_one_cycle_triangle():
    """sched poly, power 1, warmup_lr 0, warmup_prefix: lr rises linearly from 0 to lr over the
    warmup updates and falls linearly to 0 over the rest of the run."""
    from timm_edl.train.trainer import _scheduler
    cfg = load_config(None, ['--epochs', '5', '--lr', '0.4', '--sched', 'poly', '--decay-rate', '1',
                             '--warmup-epochs', '2', '--warmup-lr', '0', '--warmup-prefix', 'true',
                             '--sched-on-updates', 'true', '--min-lr', '0'])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = _scheduler(cfg, optimizer, updates_per_epoch=10)
    for update in range(51):
        scheduler.step_update(update)
        expected = 0.4 * update / 20 if update < 20 else 0.4 * (1 - (update - 20) / 30)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(expected, abs=1e-12), update


def _device_batches(seed=0, n=40, batch=8):
    from timm_edl.train.data import DeviceBatches
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return DeviceBatches(images, torch.arange(n) % 10, torch.arange(100, 100 + n), batch, seed,
                         torch.device('cpu'), pad=4, flip_p=0.5)


def test_device_batches_are_seeded_reproducible_and_resumable():
    from timm_edl.train.data import EpochShuffleSampler
    data = _device_batches()
    first = list(data.batches(0))
    assert len(first) == len(data) == 5
    again = list(_device_batches().batches(0))
    assert all(torch.equal(a, b) for fa, fb in zip(first, again) for a, b in zip(fa, fb))
    resumed = list(data.batches(0, skip=2))  # a resumed run continues with exactly the same batches
    assert all(torch.equal(a, b) for fa, fb in zip(first[2:], resumed) for a, b in zip(fa, fb))
    other_epoch, other_seed = next(data.batches(1)), next(_device_batches(seed=1).batches(0))
    assert not torch.equal(first[0][0], other_epoch[0]) and not torch.equal(first[0][0], other_seed[0])
    # the order is the loader path's: EpochShuffleSampler's permutation, in batches, indices mapped back
    order = [i for _, i in EpochShuffleSampler(40, 0)]
    assert torch.cat([index for _, _, index in first]).tolist() == [100 + i for i in order]
    assert torch.equal(first[0][1], torch.tensor(order[:8]) % 10)


def test_device_crops_have_the_loader_paths_distribution():
    """The outcome (offset, flip) of a device crop and of the loader path's transform
    (timm_edl.data.train_transforms: RandomCrop(32, padding=4) + RandomHorizontalFlip) has the same
    support, the 9 x 9 x 2 zero-padded crops, and both are uniform on it (chi-square)."""
    from timm_edl import data as D
    from timm_edl.train.data import DeviceBatches
    g = torch.Generator().manual_seed(0)
    image = torch.randint(1, 256, (1, 3, 32, 32), generator=g, dtype=torch.uint8)  # nonzero: crops are distinct
    padded = torch.nn.functional.pad(image[0], (4, 4, 4, 4))
    outcomes = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy:dy + 32, dx:dx + 32]
            outcomes[crop.numpy().tobytes()] = (dy, dx, 0)
            outcomes[crop.flip(-1).numpy().tobytes()] = (dy, dx, 1)
    assert len(outcomes) == 162
    key = lambda x: (x * 255).round().to(torch.uint8).numpy().tobytes()  # noqa: E731
    n = 3240  # 20 per outcome
    info = D.dataset_info('cifar10-jpeg')
    transform = D.train_transforms(info)
    torch.manual_seed(0)
    loader = [outcomes[key(transform(image[0].float() / 255))] for _ in range(n)]
    data = DeviceBatches(image, torch.zeros(1), torch.zeros(1), 1, 0, torch.device('cpu'), pad=4, flip_p=0.5)
    device = [outcomes[key(x)] for x in data.crop_and_flip(torch.zeros(n, dtype=torch.long),
                                                           torch.Generator().manual_seed(0))]
    counts = [torch.tensor([draws.count(o) for o in outcomes.values()], dtype=torch.float64)
              for draws in (loader, device)]
    for c in counts:  # uniform: chi-square with 161 degrees of freedom (mean 161, sd 18)
        assert (c > 0).all() and float(((c - n / 162) ** 2 / (n / 162)).sum()) < 250
    a, b = counts
    assert float(((a - b) ** 2 / (a + b)).sum()) < 250  # the two samples are homogeneous


def test_channels_last_trains_the_same_weights_within_float_tolerance(tmp_path):
    kwargs = dict(epochs=1, data_on_device='true', val_n_ex=0)
    a = train(tiny_config(tmp_path / 'nchw', **kwargs)).model.state_dict()
    b = train(tiny_config(tmp_path / 'nhwc', channels_last='true', **kwargs)).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
    model = timm.create_model(f'local-dir:{tmp_path / "nhwc" / "final"}', pretrained=True)
    assert all(torch.equal(v, b[k]) for k, v in model.state_dict().items())  # exported contiguous, same values


def test_compile_runs_and_matches_eager(tmp_path):
    """compile: true through accelerate's TorchDynamoPlugin (backend 'eager': traced, not compiled)."""
    kwargs = dict(epochs=1, train_n_ex=64, val_n_ex=0, objective='fast',
                  model_kwargs=TINY_KWARGS[:-1] + ', edl_layers: none}')
    eager = train(tiny_config(tmp_path / 'eager', **kwargs)).model.state_dict()
    result = train(tiny_config(tmp_path / 'compiled', compile='true', compile_backend='eager', **kwargs))
    assert result.completed and result.global_update == 2
    compiled = result.model.state_dict()
    assert eager.keys() == compiled.keys()  # the unwrapped model: no _orig_mod. prefixes
    for k in eager:
        assert torch.allclose(eager[k].float(), compiled[k].float(), rtol=1e-4, atol=1e-6), k


def test_time_budget_stops_saves_and_resumes(reference_run, tmp_path):
    """A budget used up during the first step: the run stops after it, saves the state and
    final/, says so, and --resume finishes with the weights of the uninterrupted run."""
    out = tmp_path / 'run'
    args = tiny_args(out, elastic_from_epoch=1, model_ema='true', save_every_steps=1, keep_checkpoints=100)
    result = train(load_config(None, args + ['--time-budget-min', '1e-6']))
    assert not result.completed and result.stop_reason == 'time_budget' and result.global_update == 1
    progress = json.loads((out / 'checkpoints' / 'step_000000001' / 'progress.json').read_text())
    assert progress['stopped'] == 'time_budget' and progress['step_in_epoch'] == 1
    assert (out / 'final' / 'model.safetensors').is_file()
    assert 'stopped on the time budget' in (out / 'log.txt').read_text()
    assert main(['--resume', '--output', str(out), '--time-budget-min', 'null']) == 0
    _compare_runs(reference_run, out)


@contextlib.contextmanager
def sigint_on_step(monkeypatch, step: int, times: int = 1, handler=signal.default_int_handler):
    """A real SIGINT sent to this process ``times`` times as optimizer step ``step`` starts,
    with SIGINT's handler ``handler`` while the block runs (the test runner's may differ)."""
    import timm_edl.train.loop as loop
    original, calls = loop.train_step, []

    def signalling_step(run, epoch, x, y):
        calls.append(1)
        if len(calls) == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        original(run, epoch, x, y)

    monkeypatch.setattr(loop, 'train_step', signalling_step)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
        assert signal.getsignal(signal.SIGINT) is handler  # put back by the run
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize('step', [3, STEPS_PER_EPOCH])
def test_ctrl_c_stops_at_the_next_optimizer_step_saves_and_resumes(reference_run, tmp_path, monkeypatch, capsys,
                                                                   step):
    """Ctrl-C during step 3 (mid-epoch) or the epoch's last step (then the epoch is validated
    first): the run stops after that step with its state and final/ saved, exits 130 saying
    how to go on, and --resume ends with the weights of the uninterrupted run."""
    out = tmp_path / 'run'
    args = tiny_args(out, elastic_from_epoch=1, model_ema='true', save_every_steps=100)
    with sigint_on_step(monkeypatch, step):
        assert main(args) == 130
    assert f'interrupted after {step} optimizer steps' in capsys.readouterr().err
    progress = json.loads((out / 'checkpoints' / f'step_{step:09d}' / 'progress.json').read_text())
    assert progress['stopped'] == 'interrupted'
    assert (out / 'final' / 'model.safetensors').is_file()
    assert 'stopped on Ctrl-C' in (out / 'log.txt').read_text()
    summary = out / 'summary.csv'
    assert (len(read_summary(summary)) if summary.exists() else 0) == step // STEPS_PER_EPOCH  # validated epochs
    monkeypatch.undo()
    assert main(['--resume', '--output', str(out)]) == 0
    _compare_runs(reference_run, out)


def test_a_second_ctrl_c_stops_at_once_and_an_ignored_one_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / 'twice'
    with pytest.raises(KeyboardInterrupt), sigint_on_step(monkeypatch, 2, times=2):
        train(tiny_config(out, epochs=1))
    assert not (out / 'checkpoints').exists() or not any((out / 'checkpoints').iterdir())
    with sigint_on_step(monkeypatch, 2, handler=signal.SIG_IGN):  # a background job's SIGINT
        result = train(tiny_config(tmp_path / 'ignored', epochs=1))
    assert result.completed and result.global_update == STEPS_PER_EPOCH


def test_best_epoch_is_the_one_with_the_best_held_out_pgd_accuracy(tmp_path, monkeypatch):
    """best/ holds the weights of the epoch whose held-out PGD accuracy was highest (epoch 2 of
    the scripted 10 %, 30 %, 20 %); with val_split: test nothing is selected."""
    import timm_edl.train.loop as loop
    scripted = iter([10.0, 30.0, 20.0] * 2)
    monkeypatch.setattr(loop, 'validate', lambda *a, **k: {'clean_top1': 50.0, 'robust_top1': next(scripted)})
    out = tmp_path / 'run'
    result = train(tiny_config(out, epochs=3, keep_checkpoints=100))
    assert result.best_epoch == 1 and result.best_metric == 30.0
    best = load_file(str(out / 'best' / 'model.safetensors'))
    at_epoch_2 = load_file(str(out / 'checkpoints' / f'step_{2 * STEPS_PER_EPOCH:09d}' / 'model.safetensors'))
    final = load_file(str(out / 'final' / 'model.safetensors'))
    assert best.keys() == at_epoch_2.keys()
    assert all(torch.equal(best[k], at_epoch_2[k]) for k in best)
    assert any(not torch.equal(best[k], final[k]) for k in best)
    test_split = train(tiny_config(tmp_path / 'test_split', epochs=3, val_split='test'))
    assert test_split.best_epoch is None and not (tmp_path / 'test_split' / 'best').exists()

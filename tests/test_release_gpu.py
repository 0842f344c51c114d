"""The GPU release path (experiments/release_gpu.py) on the CPU: the whole command at toy size,
bf16 autocast dtypes, no host synchronisation in the training step, the on-device data path
and the environment check of the bootstrap."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import timm
import timm_edl  # noqa: F401  (registers edlnet_*)
from timm_edl import EDLConv2d

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'experiments' / 'release_gpu.py'
CIFAR10_JPEG_DIR = REPO_ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg'


def _release():
    spec = importlib.util.spec_from_file_location('release_gpu', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R = _release()


class _Recorder(TorchDispatchMode):
    """Every aten op's output dtypes, and the ops that read device values on the host
    (``item``/``float()``/``bool()`` go through ``_local_scalar_dense``; ``nonzero`` and
    ``masked_select`` have data-dependent shapes) with the Python stack that called them."""

    SYNCS = ('aten._local_scalar_dense', 'aten.nonzero', 'aten.masked_select')

    def __init__(self):
        super().__init__()
        self.dtypes = {}
        self.largest = {}  # dtype -> most elements of one output
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name.startswith(self.SYNCS):
            self.syncs.append((name, ''.join(traceback.format_stack(limit=40))))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.dtypes.setdefault(t.dtype, set()).add(name)
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


def test_edl_layer_under_bf16_autocast_on_cpu():
    layer = EDLConv2d(8, 16, 3, padding=1, num_steps=2, beta=0.5, lam=0.1)
    x = torch.rand(4, 8, 16, 16, requires_grad=True)
    with _Recorder() as rec, torch.autocast('cpu', dtype=torch.bfloat16):
        z = layer(x)
        z.float().square().mean().backward()
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()
    assert torch.float64 not in rec.dtypes, rec.dtypes.get(torch.float64)
    assert layer.lipschitz.dtype == torch.float32 and layer.power_vector.dtype == torch.float32
    for p in (layer.weight, layer.beta, x):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def _tiny_run_args(output, *extra):
    """A release-shaped tiny recipe: FGSM-RS, bf16 autocast, data on the device, channels_last."""
    return ['--dataset', 'fashion-mnist-small', '--model-kwargs', '{widths: [8, 16, 32, 64]}', '--epochs', '1',
            '--batch-size', '8', '--train-n-ex', '32', '--val-n-ex', '0', '--objective', 'fast', '--eps', '8/255',
            '--mixed-precision', 'bf16', '--data-on-device', 'true', '--channels-last', 'true', '--progress',
            'never', '--output', str(output), *extra]


@pytest.mark.parametrize('edl_layers', ['default', 'none'])
def test_trainer_step_under_bf16_autocast_keeps_dtypes_and_does_not_synchronise(tmp_path, edl_layers):
    """The trainer's step as the release runs it: bf16 compute, float32 parameters, gradients and
    metric sums, nothing in float64 but the sums; and no value read back to the host outside the
    EDL layers' CPU-only reads and the attack's input check (finite, in [0, 1])."""
    from timm_edl.train import load_config, open_run
    from timm_edl.train.loop import train_step
    cfg = load_config(None, _tiny_run_args(tmp_path / 'run', '--model-kwargs.edl_layers', edl_layers))
    with open_run(cfg) as run:
        x, y, _ = next(run.train_loader.batches(0))
        train_step(run, 0, x, y)  # first step: every EDL layer computes L cold
        before = {k: v.clone() for k, v in run.raw.state_dict().items()}
        sums = run.state.sums.clone()
        with _Recorder() as rec:
            train_step(run, 0, x, y)
        assert rec.largest.get(torch.float64, 0) <= len(run.state.sums)  # float64: the metric sums only
        assert torch.bfloat16 in rec.dtypes
        assert run.state.sums[0] == sums[0] + len(y) and torch.isfinite(run.state.sums).all()
        for name, p in run.raw.named_parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
            if p.requires_grad and p.grad is not None:
                assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        assert any(not torch.equal(before[k], v) for k, v in run.raw.state_dict().items())  # it trained
    # host synchronisation: none outside the EDL layers' CPU-only reads (on an accelerator they read
    # nothing: tests/test_layer.py::test_accelerator_path_never_reads_a_value_back_to_the_host) and
    # the attack's input check
    outside = [stack for name, stack in rec.syncs
               if 'timm_edl/layers/' not in stack and '_check_images_and_labels' not in stack]
    assert not outside, outside[0]


def test_device_batches_crop_and_flip_match_a_direct_computation():
    from timm_edl.train.data import DeviceBatches
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    data = DeviceBatches(images, torch.arange(6), torch.arange(6), 3, 0, torch.device('cpu'), pad=2, flip_p=0.5)
    rows = torch.tensor([4, 1, 5])
    x = data.crop_and_flip(rows, torch.Generator().manual_seed(3))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 8, 8)
    # replay the draws: offsets in [0, 2 pad], then the flips
    rg = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 5, (3, 1), generator=rg), torch.randint(0, 5, (3, 1), generator=rg)
    flip = torch.rand(3, generator=rg) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for k, i in enumerate(rows.tolist()):
        crop = padded[i, :, dy[k, 0]:dy[k, 0] + 8, dx[k, 0]:dx[k, 0] + 8]
        crop = crop.flip(-1) if flip[k] else crop
        assert torch.equal(x[k], crop.float() / 255)
    plain = DeviceBatches(images, torch.arange(6), torch.arange(6), 3, 0, torch.device('cpu'))
    assert torch.equal(plain.crop_and_flip(rows), images[rows].float() / 255)


def test_release_driver_trains_what_timm_edl_train_trains(tmp_path):
    """The release's training is `timm-edl train --config <recipe> <overrides>`: the driver and the
    command line, same recipe and seed, end with bit-identical weights."""
    from safetensors.torch import load_file
    from timm_edl.cli.train import main
    args = R.parse_args(['--device', 'cpu', '--toy', '--dataset', 'fashion-mnist-small', '--train-n', '64',
                         '--val-n', '8', '--amp', 'none', '--out', str(tmp_path / 'release')])
    driven = R.train_model(args, 'edlnet', 'default', 2, tmp_path / 'driver', None, steps_per_epoch=2)
    assert driven['epochs_done'] == 2 and [r['stage'] for r in driven['history']] == ['vanilla', 'elastic']
    assert driven['train_command'].startswith(f'timm-edl train --config {R.RECIPE} ')
    assert main(['--config', R.RECIPE] + R.train_args(args, 'default', 2, tmp_path / 'cli')) == 0
    for export in ('final', 'best'):
        a = load_file(str(tmp_path / 'driver' / export / 'model.safetensors'))
        b = load_file(str(tmp_path / 'cli' / export / 'model.safetensors'))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), export


def test_environment_check(capsys):
    assert R.main(['--check-env', '--device', 'cpu']) == 0
    env = json.loads(capsys.readouterr().out)
    assert R._version_tuple(env['versions']['torch']) >= (2, 11)
    assert env['versions']['pyautoattack']
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='CUDA is not available'):
            R.main(['--check-env', '--device', 'cuda'])
    assert R._version_tuple('2.11.0+cu130') == (2, 11, 0) and R._version_tuple('1.0.31.dev0') == (1, 0, 31)


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 autocast on the CPU is emulated, ~10x slower than float32."""
    try:
        flags = Path('/proc/cpuinfo').read_text()
    except OSError:
        return False
    return bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', flags))


def test_toy_release_run_on_cpu(tmp_path):
    """The release command end to end at toy size: two epochs (vanilla, then elastic) of fast AT
    for both models (under bf16 autocast where the CPU computes bf16 natively, float32 elsewhere),
    evaluation, exports, release.json."""
    if not (CIFAR10_JPEG_DIR / 'train.tar.gz').is_file():
        if os.environ.get('CI'):
            pytest.fail(f'CIFAR-10-JPEG archives missing: {CIFAR10_JPEG_DIR}')
        pytest.skip(f'no CIFAR-10-JPEG archives at {CIFAR10_JPEG_DIR}')
    out = tmp_path / 'release'
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, str(SCRIPT), '--device', 'cpu', '--toy', '--epochs', '2', '--out', str(out),
           '--data-dir', str(CIFAR10_JPEG_DIR), '--pack', str(tmp_path / 'packed')]
    amp = 'bf16' if _cpu_has_native_bf16() else 'none'
    cmd += ['--amp', amp]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / 'release.json').read_text())
    assert report['dataset']['display_name'] == 'CIFAR-10-JPEG' and report['settings']['amp'] == amp
    edl, twin = report['models']['edlnet'], report['models']['conv_twin']
    assert edl['epochs_done'] == twin['epochs_done'] == 2
    assert [r['stage'] for r in edl['history']] == ['vanilla', 'elastic']
    assert [r['stage'] for r in twin['history']] == ['none', 'none']
    for m in (edl, twin):
        assert m['train_images_per_s'] > 0 and m['eval_full']['pgd20_images_per_s'] > 0
        assert m['eval_full']['n_ex'] == 64 and 0 <= m['eval_full']['pgd20_acc'] <= m['eval_full']['clean_acc']
        if report['autoattack_n']:
            assert m['eval_autoattack']['autoattack_acc'] is not None
        folder = Path(m['export'])
        assert {'model.safetensors', 'config.json', 'README.md'} <= {p.name for p in folder.iterdir()}
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        from timm_edl.hub import state_dict_digest
        assert state_dict_digest(loaded) == m['eval_full']['weights_digest']
        assert 'CIFAR-10-JPEG' in (folder / 'README.md').read_text()
    assert report['calibration']['edlnet']['train_images_per_s'] > 0
    # --pack: few small files; the EDLNet's weights come back together bit for bit
    packed = sorted((tmp_path / 'packed').iterdir())
    assert packed[-1].name == 'release-results.tar.gz' and all(p.stat().st_size <= 15 * 2**20 for p in packed)
    weights = b''.join(p.read_bytes() for p in packed if '.part-' in p.name)
    assert weights == (Path(edl['export']) / 'model.safetensors').read_bytes()
    import tarfile
    with tarfile.open(packed[-1]) as tar:
        names = tar.getnames()
    assert any(n.endswith('release.json') for n in names) and not any(n.endswith('.safetensors') for n in names)

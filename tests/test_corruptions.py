"""The common-corruptions track (``timm-edl eval --threat-model corruptions``).

A small folder in the CIFAR-10-C layout is built here (random uint8 images, random labels,
12 points per severity) next to a one-batch CIFAR-10 test split with the same labels.  A
model whose prediction is a known function of the pixels (class = sum of the uint8 pixels
mod 10) makes the expected accuracy of every (corruption, severity) a count done with numpy.
"""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_edl  # noqa: F401  (registers the edlnet architectures)
from timm_edl import hub
from timm_edl.cli.eval import main
from timm_edl.data import CorruptDatasetError, DatasetNotFoundError
from timm_edl.data.corruptions import (
    CORRUPTIONS, GENERATOR, SEVERITIES, generate, open_published, parse_corruptions, parse_severities, read_layout,
)
from timm_edl.evaluation.core import unpack_correct
from timm_edl.evaluation.corruptions import evaluate_corruptions, write_corruption_outputs
from timm_edl.results import read_eval_results

PER = 12                    # points per severity in the built folder
SUBSET = ('gaussian_noise', 'fog', 'contrast')
HWC = (32, 32, 3)
TINY = dict(num_classes=10, widths=(8, 16), layers=(1, 1), stem_width=8, stem_type='imagenet')
TINY_CLI = ['--model', 'edlnet_resnet18', '--model-kwargs', 'widths=[8,16]', 'layers=[1,1]', 'stem_width=8',
            'stem_type=imagenet']


class PixelSumModel(nn.Module):
    """Predicts class (sum of the image's uint8 pixels) mod 10."""

    def forward(self, x):
        cls = torch.round(x * 255).long().sum(dim=(1, 2, 3)) % 10
        return F.one_hot(cls, 10).float()


def build_folder(root: Path, corruptions=SUBSET, per=PER, seed=0) -> dict:
    """``root/CIFAR-10-C`` (the given corruptions) and ``root/cifar-10-batches-py/test_batch``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, per)
    folder = root / 'CIFAR-10-C'
    folder.mkdir(parents=True)
    np.save(folder / 'labels.npy', np.tile(labels, 5).astype(np.uint8))
    arrays = {}
    for c in corruptions:
        arrays[c] = rng.integers(0, 256, (5 * per, *HWC), dtype=np.uint8)
        np.save(folder / f'{c}.npy', arrays[c])
    clean = rng.integers(0, 256, (per, 3, 32, 32), dtype=np.uint8)
    (root / 'cifar-10-batches-py').mkdir()
    with open(root / 'cifar-10-batches-py' / 'test_batch', 'wb') as f:
        pickle.dump({'data': clean.reshape(per, -1), 'labels': labels.tolist()}, f)
    return dict(folder=folder, labels=labels, arrays=arrays, clean=clean)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    return dict(root=root, **build_folder(root))


def expected_correct(images_nhwc: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return images_nhwc.astype(np.int64).sum(axis=(1, 2, 3)) % 10 == labels


def test_names_and_parsing():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15 and SEVERITIES == (1, 2, 3, 4, 5)
    from imagecorruptions import get_corruption_names
    assert tuple(get_corruption_names('common')) == CORRUPTIONS  # the library's 15 are RobustBench's
    assert parse_corruptions(None) == CORRUPTIONS
    assert parse_corruptions('fog, gaussian-noise') == ('gaussian_noise', 'fog')
    assert parse_severities('2-4') == (2, 3, 4) and parse_severities('5,1') == (1, 5)
    with pytest.raises(ValueError, match='unknown corruption.*speckle_noise'):
        parse_corruptions('speckle_noise')
    with pytest.raises(ValueError, match='1..5'):
        parse_severities('0,6')


# ----------------------------------------------------------------------------- evaluation on the built folder

@pytest.mark.parametrize('n', [PER, 7])
def test_accuracy_per_corruption_and_severity_is_the_count(built, n):
    labels = built['labels'][:n]
    corrupted = read_layout(built['folder'], SUBSET, n, HWC, label='CIFAR-10-C', clean_labels=built['labels'])
    x = torch.from_numpy(built['clean'][:n]).float() / 255
    report = evaluate_corruptions(PixelSumModel(), corrupted, x, torch.from_numpy(labels), corruptions=SUBSET,
                                  severities=SEVERITIES, dataset='cifar10', batch_size=5, progress=False,
                                  log=lambda m: None)
    total = 0
    for c in SUBSET:
        for s in SEVERITIES:
            rows = built['arrays'][c][(s - 1) * PER:(s - 1) * PER + n]  # the first n of severity s
            ok = expected_correct(rows, labels)
            total += int(ok.sum())
            assert report['n_correct'][c][str(s)] == int(ok.sum())
            assert report['corruption_accuracy'][c][str(s)] == int(ok.sum()) / n
            assert unpack_correct(report['per_point'][f'{c}/{s}'], n) == ok.tolist()
    assert report['corruptions_acc'] == total / (len(SUBSET) * 5 * n)
    for s in SEVERITIES:
        count = sum(report['n_correct'][c][str(s)] for c in SUBSET)
        assert report['mean_per_severity'][str(s)] == count / (len(SUBSET) * n)
    clean_ok = expected_correct(built['clean'][:n].transpose(0, 2, 3, 1), labels)
    assert report['clean_acc'] == clean_ok.sum() / n
    assert unpack_correct(report['per_point']['clean'], n) == clean_ok.tolist()
    assert report['threat_model'] == 'corruptions' and report['n_ex'] == n and report['complete'] is False
    assert report['corruption_label'] == 'CIFAR-10-C' and report['data_label'] == 'CIFAR-10'
    entry, = read_eval_results(report)  # what `timm-edl export --eval-results` reads
    assert entry['corruptions_acc'] == report['corruptions_acc'] and entry['clean_acc'] == report['clean_acc']
    assert entry['corruption_accuracy'] == report['corruption_accuracy']
    metrics = {m['type']: m for g in report['model_index'][0]['results'] for m in g['metrics']}
    assert metrics['corruption-accuracy']['value'] == pytest.approx(100 * report['corruptions_acc'], abs=0.006)


# ----------------------------------------------------------------------------- layout errors

def _copy(built, tmp_path, drop=None) -> Path:
    import shutil
    folder = tmp_path / 'CIFAR-10-C'
    shutil.copytree(built['folder'], folder)
    if drop:
        (folder / drop).unlink()
    return folder


def test_missing_folder_says_what_to_put_where(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        open_published('cifar10', tmp_path, SUBSET, 4, HWC)
    msg = str(e.value)
    assert str(tmp_path / 'CIFAR-10-C') in msg and 'labels.npy' in msg and '--download' in msg
    assert 'https://zenodo.org/records/2535967/files/CIFAR-10-C.tar' in msg
    with pytest.raises(DatasetNotFoundError, match='CIFAR-100-C.tar'):
        open_published('cifar100', tmp_path, SUBSET, 4, HWC)


def test_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError('network unreachable')

    monkeypatch.setattr(socket, 'create_connection', no_network)
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    with pytest.raises(DatasetNotFoundError, match='downloading https://zenodo.org/records/2535967'):
        open_published('cifar10', tmp_path, SUBSET, 4, HWC, download=True)


def test_missing_corruption_is_named(built, tmp_path):
    folder = _copy(built, tmp_path, drop='fog.npy')
    with pytest.raises(DatasetNotFoundError, match=r"corruption 'fog' missing: .*fog\.npy not found"):
        read_layout(folder, SUBSET, 4, HWC, label='x')
    read_layout(folder, ('contrast',), 4, HWC, label='x')  # the others still read


def test_wrong_shape_or_dtype_says_expected_and_got(built, tmp_path):
    folder = _copy(built, tmp_path)
    np.save(folder / 'fog.npy', np.zeros((5 * PER, 32, 32, 1), np.uint8))
    with pytest.raises(CorruptDatasetError, match=r'expected uint8 \(60, 32, 32, 3\).*got uint8 \(60, 32, 32, 1\)'):
        read_layout(folder, SUBSET, 4, HWC, label='x')
    np.save(folder / 'fog.npy', np.zeros((5 * PER, 32, 32, 3), np.float32))
    with pytest.raises(CorruptDatasetError, match=r'expected uint8 .*got float32'):
        read_layout(folder, SUBSET, 4, HWC, label='x')


def test_mismatched_labels_are_named(built, tmp_path):
    folder = _copy(built, tmp_path)
    wrong = built['labels'].copy()
    wrong[3] = (wrong[3] + 1) % 10
    with pytest.raises(CorruptDatasetError, match='do not match the clean test split.*point 3'):
        read_layout(folder, SUBSET, PER, HWC, label='x', clean_labels=wrong)
    uneven = np.tile(built['labels'], 5)
    uneven[3 * PER + 1] = (uneven[3 * PER + 1] + 1) % 10
    np.save(folder / 'labels.npy', uneven)
    with pytest.raises(CorruptDatasetError, match='severity 4 differ from those of severity 1'):
        read_layout(folder, SUBSET, PER, HWC, label='x')
    (folder / 'labels.npy').unlink()
    with pytest.raises(DatasetNotFoundError, match='labels.npy is missing'):
        read_layout(folder, SUBSET, PER, HWC, label='x')


# ----------------------------------------------------------------------------- generation

def _images(n, c, h, seed=0):
    """Mid-grey random images (64..191), so that no corruption saturates at once."""
    return np.random.default_rng(seed).integers(64, 192, (n, c, h, h), dtype=np.uint8)


def test_generation_is_seeded_cached_and_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    gray, labels = _images(3, 1, 28), np.arange(3)
    names = ('gaussian_noise', 'impulse_noise', 'glass_blur', 'frost')
    np.random.seed(123)
    state = np.random.get_state()
    kw = dict(labels=labels, name='fashion-mnist-test', display_name='Fashion-MNIST', corruptions=names)
    a = generate(gray, cache=tmp_path / 'a', seed=0, **kw)
    after = np.random.get_state()
    assert all(np.array_equal(u, v) if isinstance(u, np.ndarray) else u == v for u, v in zip(state, after))
    b = generate(gray, cache=tmp_path / 'b', seed=0, **kw)
    c = generate(gray, cache=tmp_path / 'c', seed=1, **kw)
    assert a.label == f"Fashion-MNIST (corruptions generated with {GENERATOR} {a.generated['version']})"
    assert a.folder.name.startswith(f"fashion-mnist-test-n3-seed0-{GENERATOR}-{a.generated['version']}-")
    for name in names:
        first, again = (a.folder / f'{name}.npy').read_bytes(), (b.folder / f'{name}.npy').read_bytes()
        assert first == again, name
        assert not np.array_equal(a.images(name, 3), c.images(name, 3)), name
        assert a.images(name, 1).shape == (3, 28, 28, 1)  # back to the dataset's format
    assert np.array_equal(np.load(a.folder / 'labels.npy'), np.tile(labels, 5))

    import timm_edl.data.corruptions as module  # a second call reads the cache: nothing is generated
    monkeypatch.setattr(module, 'corrupt_image', lambda *a, **k: pytest.fail('cache not used'))
    again = generate(gray, cache=tmp_path / 'a', seed=0, **kw)
    assert np.array_equal(again.images('frost', 5), a.images('frost', 5))
    assert generate(gray[:2], cache=tmp_path / 'a', seed=0, **{**kw, 'labels': labels[:2],
                                                                'corruptions': ()}).folder != a.folder


# the corruptions whose strength parameter grows with the severity in the library's code:
# contrast scales the deviation from the mean by 0.4 .. 0.05 and brightness adds 0.1 .. 0.5 to
# the HSV value (both deterministic and monotone per pixel); the noise scale (std 0.08 .. 0.38),
# the Poisson photon count (60 .. 3) and the salt-and-pepper fraction (0.03 .. 0.27) grow
# monotonically, as do the defocus disk radius (3 .. 10) and the zoom range (1.11 .. 1.31).
# glass_blur (iterations 2, 1, 3, 2, 2), motion_blur, snow, frost, fog and elastic_transform
# are not monotone in every parameter or draw their layout at random, so not checked here.
MONOTONE = ('contrast', 'brightness', 'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'zoom_blur')


@pytest.mark.parametrize('chans,size', [(3, 32), (1, 28)])
def test_higher_severity_moves_images_further(tmp_path, chans, size):
    clean = _images(4, chans, size, seed=1)
    data = generate(clean, np.zeros(4, int), name='t', display_name='T', cache=tmp_path, seed=0,
                    corruptions=MONOTONE)
    original = clean.transpose(0, 2, 3, 1).astype(np.float64)
    for name in MONOTONE:
        dist = [np.abs(data.images(name, s).astype(np.float64) - original).mean() for s in SEVERITIES]
        assert all(a < b for a, b in zip(dist, dist[1:])), (name, dist)


# ----------------------------------------------------------------------------- command line and card

def _cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end_on_the_built_folder(built, tmp_path, capsys):
    out_dir = tmp_path / 'out'
    args = [*TINY_CLI, '--dataset', 'cifar10', '--data-dir', str(built['root']), '--threat-model', 'corruptions',
            '--corruptions', ','.join(SUBSET), '--severities', '1,2,5', '--n-ex', '10', '--batch-size', '4',
            '--out', str(out_dir), '--no-progress', '--device', 'cpu']
    code, out, err = _cli(args, capsys)
    assert code == 0, err
    assert 'Traceback' not in err and '| gaussian_noise |' in out and 'CIFAR-10-C' in out
    stem = 'edlnet_resnet18_cifar10_corruptions'
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{stem}{s}" for s in ('.json', '.md', '.model-index.yaml'))
    report = json.loads((out_dir / f"{stem}.json").read_text())
    for key in ('model', 'data', 'n_ex', 'command', 'versions', 'clean_acc', 'corruptions_acc', 'per_point',
                'corruption_accuracy', 'mean_per_severity', 'model_index', 'robustbench', 'weights_digest'):
        assert key in report, key
    assert report['threat_model'] == 'corruptions' and report['n_ex'] == 10 and report['severities'] == [1, 2, 5]
    assert report['corruptions'] == list(SUBSET) and report['data']['corrupted']['source'] == 'published'
    assert report['command'].startswith('timm-edl eval ') and report['data']['n_total'] == PER
    # the same randomly initialised model (seed 0), evaluated here by a plain forward
    torch.manual_seed(0)
    model = timm.create_model('edlnet_resnet18', **TINY).eval()
    assert hub.state_dict_digest(model) == report['weights_digest']
    labels = torch.from_numpy(built['labels'][:10])
    for c in SUBSET:
        for s in (1, 2, 5):
            rows = built['arrays'][c][(s - 1) * PER:(s - 1) * PER + 10]
            with torch.no_grad():
                pred = model(torch.from_numpy(rows).permute(0, 3, 1, 2).float() / 255).argmax(-1)
            assert report['n_correct'][c][str(s)] == int((pred == labels).sum()), (c, s)


def test_cli_missing_folder_says_what_to_put_where(tmp_path, capsys):
    code, out, err = _cli([*TINY_CLI, '--dataset', 'cifar10', '--data-dir', str(tmp_path), '--threat-model',
                           'corruptions', '--n-ex', '4', '--out', str(tmp_path / 'out'), '--no-progress'], capsys)
    assert code == 2 and 'Traceback' not in err
    assert str(tmp_path / 'CIFAR-10-C') in err and '<corruption>.npy' in err and '--download' in err


def test_cli_refuses_options_of_the_other_track(tmp_path, capsys):
    base = [*TINY_CLI, '--dataset', 'fashion-mnist-small', '--n-ex', '4', '--out', str(tmp_path), '--no-progress']
    code, out, err = _cli([*base, '--threat-model', 'corruptions', '--attacks', 'autoattack', '--eps', '8/255'],
                          capsys)
    assert code == 2 and '--eps, --attacks: not an option of --threat-model corruptions' in err
    code, out, err = _cli([*base, '--severities', '1'], capsys)
    assert code == 2 and '--severities: only with --threat-model corruptions' in err
    assert not list(tmp_path.iterdir())


def test_cli_generates_and_labels_corruptions_for_fashion_mnist(tmp_path, capsys):
    args = ['--model', 'edlnet_resnet18', '--model-kwargs', 'in_chans=1', 'widths=[8,16]', 'layers=[1,1]',
            'stem_width=8', '--dataset', 'fashion-mnist-small', '--threat-model', 'corruptions', '--corruptions',
            'contrast', '--n-ex', '6', '--corruption-cache', str(tmp_path / 'cache'), '--out', str(tmp_path / 'out'),
            '--no-progress']
    code, out, err = _cli(args, capsys)
    assert code == 0, err
    report = json.loads(next((tmp_path / 'out').glob('*.json')).read_text())
    version = report['data']['corrupted']['generator']['version']
    assert report['corruption_label'] == f"Fashion-MNIST-small (corruptions generated with {GENERATOR} {version})"
    assert 'CIFAR-10-C' not in report['corruption_label'] and 'not comparable' in report['footnote']
    assert report['versions'][GENERATOR] == version


def test_export_puts_a_corruption_result_into_the_card(built, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('edlnet_resnet18', **TINY).eval()
    corrupted = read_layout(built['folder'], SUBSET, 8, HWC, label='CIFAR-10-C')
    report = evaluate_corruptions(model, corrupted, corruptions=SUBSET, severities=SEVERITIES, dataset='cifar10',
                                  progress=False, log=lambda m: None)
    assert report['clean_acc'] is None  # no clean points given
    files = write_corruption_outputs(report, tmp_path / 'eval', 'r')
    folder = hub.export(model, tmp_path / 'export', eval_results=files['json'], model_name='edlnet_resnet18.c')
    card = (folder / 'README.md').read_text()
    assert '### Common corruptions' in card and 'CIFAR-10-C (test, first 8 points)' in card
    pct = f"{100 * report['corruptions_acc']:.2f} %"
    assert f"corruption accuracy **{pct}** (mean over 3 corruptions x 5 severities)" in card
    assert f"| fog | {100 * report['corruption_accuracy']['fog']['1']:.2f} % |" in card
    assert 'No adversarial evaluation is recorded' in card
    import yaml
    header = yaml.safe_load(card.split('---\n')[1])
    metric, = [m for g in header['model-index'][0]['results'] for m in g['metrics']]
    assert metric['type'] == 'corruption-accuracy' and metric['value'] == pytest.approx(100 * report['corruptions_acc'],
                                                                                        abs=0.006)


def test_card_compares_corruption_results_with_a_sign_test_per_point(built, tmp_path):
    """Two models on the same corrupted points: the card's comparison row carries the exact sign
    test of the points' numbers of correct corrupted copies, checked against scipy's binomial test."""
    from scipy.stats import binomtest
    corrupted = read_layout(built['folder'], SUBSET, 8, HWC, label='CIFAR-10-C')
    torch.manual_seed(0)
    model = timm.create_model('edlnet_resnet18', **TINY).eval()
    reports, files = [], []
    for i, m in enumerate((model, PixelSumModel())):
        report = evaluate_corruptions(m, corrupted, corruptions=SUBSET, severities=SEVERITIES, dataset='cifar10',
                                      progress=False, log=lambda msg: None)
        reports.append(report)
        files.append(write_corruption_outputs(report, tmp_path / f'eval{i}', 'r')['json'])
    # per point: its correct corrupted copies, straight from the images and the two models
    x = {(c, s): torch.from_numpy(built['arrays'][c][(s - 1) * PER:(s - 1) * PER + 8]).permute(0, 3, 1, 2) / 255
         for c in SUBSET for s in SEVERITIES}
    y = torch.from_numpy(built['labels'][:8])
    counts = [sum((m(v).argmax(-1) == y).long() for v in x.values()).tolist() for m in (model, PixelSumModel())]
    better = sum(a > b for a, b in zip(*counts))
    worse = sum(a < b for a, b in zip(*counts))
    assert better + worse > 0
    p = binomtest(worse, better + worse, 0.5).pvalue
    folder = hub.export(model, tmp_path / 'export', eval_results=files[0], model_name='edlnet_resnet18.c',
                        compare_results={'pixel sum': [files[1]]})
    card = (folder / 'README.md').read_text()
    # the compared model's row: the points where this model does better / worse than it
    assert (f"| pixel sum | CIFAR-10-C | 8 | {100 * reports[1]['corruptions_acc']:.2f} % | {better} / {worse} "
            f"| {p:.3g} |") in card
    assert 'AutoAttack accuracy | PGD accuracy' not in card  # no adversarial result: no adversarial comparison

"""The zoo's shipped weights (``make zoo``, ``timm_edl/_zoo/``): listed by timm, loaded offline with
``pretrained=True`` and their sha256 checked, published through the Hub cache, fine-tuned on a
tiny ImageFolder, and their cards' numbers reproduced (clean accuracy on the first 1,000 test
points exactly, PGD-20 on the first 200 within 1 point)."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import timm
import timm_edl  # noqa: F401  (registers the edlnet_* models)
from conftest import publish_to_cache, require_cifar10_jpeg, require_fashion_mnist
from timm_edl import weights
from timm_edl.cli.eval import main as eval_main
from timm_edl.cli.export import main as export_main
from timm_edl.cli.train import main as train_main
from timm_edl.data import load_tensors
from timm_edl.models import edlnet

REPO = Path(__file__).resolve().parents[1]
# The zoo: model name -> dataset (experiments/zoo.py makes them; the test says which must ship).
ZOO = {'edlnet_resnet8_in.fashion_mnist_pgd_linf': 'fashion-mnist',
       'edlnet_resnet8_in.cifar10_jpeg_pgd_linf': 'cifar10-jpeg',
       'edlnet_resnet20.cifar10_jpeg_fast_linf': 'cifar10-jpeg',
       'edlnet_resnet20_conv.cifar10_jpeg_fast_linf': 'cifar10-jpeg',
       'edlnet_resnet8_in.cifar10_jpeg_smooth_sigma25': 'cifar10-jpeg',
       'edlnet_resnet8_in_conv.cifar10_jpeg_smooth_sigma25': 'cifar10-jpeg'}
REQUIRE = {'fashion-mnist': require_fashion_mnist, 'cifar10-jpeg': require_cifar10_jpeg}
# Models trained for randomized smoothing: the folder of the certification their card reports.
_SMOOTHING = 'experiments/cache/zoo/cpu/cifar10-jpeg-smoothing'
CERTIFIED = {'edlnet_resnet8_in.cifar10_jpeg_smooth_sigma25': f'{_SMOOTHING}/edl_eval/certify',
             'edlnet_resnet8_in_conv.cifar10_jpeg_smooth_sigma25': f'{_SMOOTHING}/conv_eval/certify'}


def test_the_package_ships_every_zoo_model():
    shipped = weights.shipped_weights()
    assert set(shipped) == set(ZOO)
    for name, entry in shipped.items():
        path = Path(entry['path'])
        assert path.parent == weights.ZOO_DIR and path.is_file()
        assert path.stat().st_size == entry['bytes'] and weights.file_sha256(path) == entry['sha256']
        assert (REPO / entry['card']).is_file(), f"{name}: its card {entry['card']} is missing"


def test_list_pretrained_in_a_fresh_offline_interpreter():
    """What a user runs first (list the pretrained tags, load each one), with the network off."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    code = ("import timm, timm_edl; print(timm.list_pretrained('edlnet*'))\n"
            "for n in timm.list_pretrained('edlnet*'): timm.create_model(n, pretrained=True)\nprint('ok')")
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed, ok = proc.stdout.strip().split('\n')
    assert sorted(ast.literal_eval(listed)) == sorted(ZOO) and ok == 'ok'


@pytest.mark.parametrize('name', sorted(ZOO))
def test_pretrained_loads_the_shipped_file_offline(name, hub_cache):
    model = timm.create_model(name, pretrained=True)
    entry = weights.shipped_weights()[name]
    saved = safetensors.torch.load_file(entry['path'])
    state = model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    cfg = model.pretrained_cfg
    assert cfg['hf_hub_id'] == f'{weights.HUB_NAMESPACE}/{name}' and cfg['file'] == entry['path']
    assert model.num_classes == 10 and model.in_chans == cfg['input_size'][0]
    assert not any(hub_cache.iterdir())  # nothing was fetched


def test_a_damaged_shipped_file_is_refused(tmp_path, monkeypatch):
    zoo = tmp_path / '_zoo'
    shutil.copytree(weights.ZOO_DIR, zoo)
    monkeypatch.setattr(weights, 'ZOO_DIR', zoo)
    monkeypatch.setattr(weights, 'ZOO_MANIFEST', zoo / 'manifest.json')
    name = sorted(ZOO)[0]
    path = zoo / weights.shipped_weights()[name]['file']
    weights.check_shipped_file(path)  # intact
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one weight byte: still a valid safetensors file
    path.write_bytes(bytes(data))
    weights.check_safetensors_file(path)
    with pytest.raises(weights.CorruptCheckpointError, match='do not match the package'):
        weights.check_shipped_file(path)
    with pytest.raises(weights.CorruptCheckpointError, match='Reinstall'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_tags_without_weights_name_the_shipped_ones(hub_cache):
    with pytest.raises(edlnet.PretrainedWeightsUnavailable) as info:
        timm.create_model('edlnet_resnet18.cifar10', pretrained=True)
    for name in ZOO:
        assert name in str(info.value)
    assert sorted(edlnet.tags_with_weights()) == sorted(ZOO)


@pytest.mark.parametrize('name', sorted(ZOO))
def test_the_hub_repository_the_cfg_names_loads_offline(name, tmp_path, hub_cache):
    """``timm-edl export`` of the shipped model, laid out in the offline Hub cache as the
    repository its pretrained cfg names: both ``hf-hub:`` and the registry tag without its
    packaged file load it from there, with the shipped model's logits."""
    out = tmp_path / 'export'
    assert export_main(['--model', name, '--out', str(out)]) == 0
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    publish_to_cache(out, repo, hub_cache)
    shipped = timm.create_model(name, pretrained=True).eval()
    x = torch.rand(4, *shipped.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = shipped(x)
        for model in (timm.create_model(f'hf-hub:{repo}', pretrained=True),
                      timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=None))):
            assert torch.equal(model.eval()(x), ref)


def _card_number(card: str, pattern: str) -> float:
    match = re.search(pattern, card)
    assert match, f'the card has no line matching {pattern!r}'
    return float(match.group(1))


@pytest.mark.parametrize('name', sorted(ZOO))
def test_the_card_numbers_reproduce(name, tmp_path, hub_cache):
    ds = ZOO[name]
    REQUIRE[ds]()
    card = (REPO / weights.shipped_weights()[name]['card']).read_text()
    card_clean = _card_number(card, r'Clean accuracy on the first 1,000 test points: ([\d.]+) %')
    card_pgd = (_card_number(card, r'PGD-20 accuracy on the first 200 test points: ([\d.]+) %')
                if 'PGD-20 accuracy on the first 200' in card else None)
    if card_pgd is not None:  # the same number is in the evaluation table, for the 1,000-point AutoAttack run
        assert re.search(rf'\| 1000 \| Linf \| [^|]+ \| {card_clean:.2f} % \|', card)

    model = timm.create_model(name, pretrained=True).eval()
    x, y = load_tensors(ds, split='test', n_ex=1000)
    with torch.no_grad():
        correct = torch.cat([model(x[i:i + 250]).argmax(1) == y[i:i + 250] for i in range(0, 1000, 250)])
    assert round(100 * correct.float().mean().item(), 2) == card_clean

    if card_pgd is None:  # a model trained for randomized smoothing: its certificates are checked below
        return
    eps = {'fashion-mnist': '0.1', 'cifar10-jpeg': '8/255'}[ds]
    out = tmp_path / 'eval'
    rc = eval_main(['--model', name, '--dataset', ds, '--n-ex', '200', '--attacks', 'pgd', '--pgd-steps', '20',
                    '--no-checks', '--eps', eps, '--out', str(out), '--no-progress', '--device', 'cpu'])
    assert rc == 0
    report, = [json.loads(p.read_text()) for p in out.glob('*.json')]
    assert abs(100 * report['pgd_acc'] - card_pgd) <= 1.0


@pytest.mark.parametrize('name', sorted(CERTIFIED))
def test_the_certificates_reproduce(name, hub_cache):
    """The first points of the certification behind the card: the same prediction, a count of the
    top class within 2 of 10,000 (floating-point sums may differ between CPUs), the same radius to 0.01."""
    from timm_edl.evaluation.smoothing import certify
    require_cifar10_jpeg()
    report = json.loads(next((REPO / CERTIFIED[name]).glob('*.json')).read_text())
    card = (REPO / weights.shipped_weights()[name]['card']).read_text()
    assert 'Certified robustness (randomized smoothing)' in card and f"n = {report['n']:,}" in card
    x, y = load_tensors(ZOO[name], split='test', n_ex=2)
    model = timm.create_model(name, pretrained=True).eval()
    records = certify(model, x, y, sigma=report['sigma'], n0=report['n0'], n=report['n'], alpha=report['alpha'],
                      seed=report['seed'], batch=1000)
    for got, want in zip(records, report['points'][:2]):
        assert got['prediction'] == want['prediction'] and abs(got['count'] - want['count']) <= 2
        if want['radius'] is not None:
            assert abs(got['radius'] - want['radius']) <= 0.01


def _tiny_image_folder(root: Path) -> None:
    """Two classes of 40x48 JPEGs (reddish vs bluish noise), train/ and test/."""
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('test', 6)):
        for c, channel in enumerate(('red', 'blue')):
            folder = root / split / channel
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 120, (40, 48, 3), dtype=np.uint8)
                img[..., 0 if c == 0 else 2] += 120
                Image.fromarray(img).save(folder / f'{i}.jpg')


def test_imagefolder_finetune_starts_from_the_shipped_model(tmp_path, hub_cache):
    """The README's two commands: fine-tune from the shipped CIFAR-10-JPEG model, then evaluate."""
    data, out = tmp_path / 'my_images', tmp_path / 'run'
    _tiny_image_folder(data)
    rc = train_main(['--config', 'edlnet_resnet8_in_imagefolder_finetune', '--data-dir', str(data),
                     '--output', str(out), '--epochs', '1', '--batch-size', '8', '--num-workers', '0',
                     '--val-n-ex', '8', '--attack-steps', '2', '--val-attack-steps', '2', '--progress', 'never'])
    assert rc == 0
    tuned = timm.create_model(f'local-dir:{out / "final"}', pretrained=True)
    source = timm.create_model('edlnet_resnet8_in.cifar10_jpeg_pgd_linf', pretrained=True)
    assert tuned.num_classes == 2 and list(tuned.pretrained_cfg['label_names']) == ['blue', 'red']
    # a few SGD steps at the warm-up learning rate: the dictionaries are still the shipped ones
    for key in ('conv1.weight', 'layer2.0.conv1.weight', 'layer3.0.conv2.weight'):
        a, b = tuned.state_dict()[key], source.state_dict()[key]
        assert (a - b).abs().max() < 1e-2 * b.abs().max(), key
    rc = eval_main(['--model', f'local-dir:{out / "best"}', '--dataset', 'imagefolder', '--data-dir', str(data),
                    '--split', 'test', '--image-size', '32', '--eps', '8/255', '--attacks', 'pgd', '--pgd-steps', '5',
                    '--no-checks', '--out', str(tmp_path / 'eval'), '--no-progress', '--device', 'cpu'])
    assert rc == 0
    report, = [json.loads(p.read_text()) for p in (tmp_path / 'eval').glob('*.json')]
    assert report['n_ex'] == 12 and report['dataset'] == 'imagefolder'

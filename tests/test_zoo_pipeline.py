"""``experiments/zoo.py`` end to end at smoke size on the real Fashion-MNIST: train + evaluate two
jobs, cache them, resume without retraining, refuse a cache made otherwise, and ship (export,
package copy with manifest, card with the conv twin's numbers, docs and README tables), keeping
the shipped weights once (the package's copy) and shipping again from it."""
import json
import sys
from pathlib import Path

import pytest
import safetensors.torch

from conftest import require_fashion_mnist
from timm_edl.weights import file_sha256

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments'))

import zoo  # noqa: E402
from _jobs import CacheMismatch  # noqa: E402


def test_smoke_zoo_trains_caches_resumes_and_ships(tmp_path, capsys):
    require_fashion_mnist()
    d = {k: tmp_path / k for k in ('cache', 'runs', 'pkg', 'cards')}
    md, readme = tmp_path / 'zoo.md', tmp_path / 'README.md'
    readme.write_text('# project\n\n<!-- begin section: zoo -->\n<!-- end section: zoo -->\n\n## after\n')
    args = ['--size', 'smoke', '--jobs', '1', '--cache-dir', str(d['cache']), '--run-dir', str(d['runs']),
            '--zoo-dir', str(d['pkg']), '--card-dir', str(d['cards']), '--out-md', str(md), '--readme', str(readme)]
    assert zoo.main(args) == 0
    name = 'edlnet_resnet8_in.fashion_mnist_pgd_linf'
    edl = json.loads((d['cache'] / 'fashion-mnist' / 'edl.json').read_text())
    conv = json.loads((d['cache'] / 'fashion-mnist' / 'conv.json').read_text())
    assert edl['evals']['full']['report']['n_ex'] == 64 and edl['evals']['aa']['report']['n_ex'] == 32
    assert edl['train']['epochs'] and edl['commit'] and edl['machine']['cores']
    assert edl['evals']['aa']['report']['edl_beta'] and not conv['evals']['aa']['report']['edl_beta']

    # shipped: the package copy is the export's weights, the manifest records its sha256
    manifest = json.loads((d['pkg'] / 'manifest.json').read_text())
    entry = manifest[name]
    shipped = d['pkg'] / entry['file']
    assert entry['sha256'] == file_sha256(shipped) and entry['bytes'] == shipped.stat().st_size
    trained = safetensors.torch.load_file(str(d['runs'] / 'fashion-mnist' / 'edl' / 'train' / 'final'
                                              / 'model.safetensors'))
    copy = safetensors.torch.load_file(str(shipped))
    assert set(trained) == set(copy) and all((trained[k] == copy[k]).all() for k in trained)
    # one stored copy of the shipped weights, the package's; the twin's stay in the cache
    final = d['cache'] / 'fashion-mnist' / 'edl_final'
    assert (final / 'config.json').is_file() and not (final / 'model.safetensors').exists()
    assert (d['cache'] / 'fashion-mnist' / 'conv_final' / 'model.safetensors').is_file()
    card = (d['cards'] / f'{name}.md').read_text()
    twin_clean = f"{100 * conv['evals']['full']['report']['clean_acc']:.2f} %"
    assert 'conv twin (edl_layers: none, same recipe)' in card and twin_clean in card
    assert 'Gradient-masking checks' in card and 'not CIFAR-10' in card and edl['train_command'] in card
    text = readme.read_text()
    assert '| `edlnet_resnet8_in` | `fashion_mnist_pgd_linf` |' in text
    assert text.endswith('## after\n') and text.startswith('# project\n')
    assert f'`{name}`' in md.read_text() and (tmp_path / 'zoo' / 'curves.png').is_file()

    # resumed: nothing is retrained, the model ships again from the package copy (same bytes)
    capsys.readouterr()
    assert zoo.main(args) == 0
    assert '2 cached, 0 to run' in capsys.readouterr().out
    assert json.loads((d['pkg'] / 'manifest.json').read_text())[name]['sha256'] == entry['sha256']
    # a package copy that is not the trained file is refused, naming the file
    data = bytearray(shipped.read_bytes())
    data[-1] ^= 0xFF
    shipped.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match='does not match its sha256'):
        zoo.main(args + ['--ship-only'])
    # a cache made with other settings is refused
    edl['spec']['overrides'] = edl['spec']['overrides'] + ['--epochs', '7']
    (d['cache'] / 'fashion-mnist' / 'edl.json').write_text(json.dumps(edl))
    with pytest.raises(CacheMismatch):
        zoo.main(args)

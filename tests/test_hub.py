"""timm_edl.hub: export -> (offline) Hub cache / local folder -> load, through timm's and
huggingface_hub's real code, plus every error path of the spec.

The Hub is never contacted: huggingface_hub runs in offline mode against a cache built here
in the layout it reads (``models--<ns>--<name>/refs/main`` + ``snapshots/<sha>/``).  The
library reads ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` at import time, so in-process tests patch
the module constants it documents (``huggingface_hub.constants``); one test runs a fresh
interpreter with the environment variables, as a user would.
"""
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

import timm
import timm_edl
from conftest import publish_to_cache
from timm_edl import hub
from timm_edl.cli.export import main as export_main
from timm_edl.cli.push import main as push_main
from timm_edl.convert import _EDL_KEYS
from timm_edl.data.constants import CIFAR10_CLASSES
from timm_edl.models import edlnet

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(widths=(8, 16, 32, 64), stem_width=8)  # edlnet_resnet18 at 1/8 width: fast on CPU
EVAL = dict(dataset='cifar10', split='test', n_ex=1000, clean_acc=0.8512, autoattack_acc=0.4931,
            pgd_acc=0.5077, threat_model='Linf', eps=8 / 255, attack='autoattack', version='standard',
            pgd_steps=20, pgd_restarts=1)


# ----------------------------------------------------------------------------- helpers

def tiny_edlnet(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('edlnet_resnet18', **{**TINY, **kwargs})
    _randomize_bn(model)
    return model.eval()


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny EDLNet (forwarded once, so its cached L is saved too), its export, its logits."""
    model = tiny_edlnet()
    x = images(3, 3, 32, 32)
    y = logits(model, x)
    results = dict(EVAL, weights_digest=hub.state_dict_digest(model))
    out = hub.export(model, tmp_path_factory.mktemp('export') / 'edlnet_resnet18.test',
                     eval_results=results, model_name='edlnet_resnet18.test')
    return dict(model=model, x=x, y=y, folder=out)


def read_card(folder):
    text = (Path(folder) / 'README.md').read_text()
    match = re.match(r'^---\n(.*?)\n---\n', text, re.S)
    assert match, 'the card must start with a YAML header'
    return yaml.safe_load(match.group(1)), text


@pytest.fixture
def pickle_hook():
    """EDLNet creation goes through hub.check_pretrained_source (edlnet._create_edlnet)."""
    assert 'check_pretrained_source' in inspect.getsource(edlnet._create_edlnet)


# ----------------------------------------------------------------------------- export

def test_export_writes_the_folder_timm_reads(exported):
    folder, model = exported['folder'], exported['model']
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    header = hub.check_safetensors_file(folder / 'model.safetensors')
    assert set(header) == set(model.state_dict())
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'edlnet_resnet18'
    assert config['num_classes'] == 10 and config['num_features'] == 64
    assert config['label_names'] == list(CIFAR10_CLASSES)
    args = config['model_args']
    assert args['widths'] == [8, 16, 32, 64] and args['stem_width'] == 8 and args['in_chans'] == 3
    assert args['edl_layers'] == 'default'
    # every EDL hyperparameter, defaults included; not how this machine runs the solver
    assert set(args['edl_cfg']) == _EDL_KEYS - {'compile_solver'}
    assert args['input_mean'] == [0.4914, 0.4822, 0.4465] and args['input_std'] == [0.2471, 0.2435, 0.2616]
    cfg = config['pretrained_cfg']
    assert cfg['tag'] == 'test' and cfg['mean'] == [0.0] * 3 and cfg['std'] == [1.0] * 3
    assert not {'file', 'hf_hub_id', 'url', 'source'} & set(cfg)
    meta = config['timm_edl']
    assert meta['model_name'] == 'edlnet_resnet18.test' and meta['repo_id'] == 'timm-edl/edlnet_resnet18.test'
    assert meta['weights_sha256'] == hashlib.sha256((folder / 'model.safetensors').read_bytes()).hexdigest()
    assert meta['evaluation'][0]['autoattack_acc'] == EVAL['autoattack_acc']


def test_card_header_and_model_index_come_from_the_evaluation_json(exported):
    from huggingface_hub import ModelCard
    meta, text = read_card(exported['folder'])
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert {'adversarial-robustness', 'image-classification', 'timm', 'edlnet'} <= set(meta['tags'])
    assert meta['datasets'] == ['cifar10']
    card = ModelCard(text)  # huggingface_hub's own parser of the model-index
    results = {(r.metric_type, r.metric_name): r for r in card.data.eval_results}
    assert card.data.model_name == 'edlnet_resnet18.test'
    clean = results[('accuracy', 'Clean accuracy')]
    assert clean.metric_value == pytest.approx(100 * EVAL['clean_acc']) and clean.dataset_type == 'cifar10'
    robust = [r for r in card.data.eval_results if r.metric_type == 'robust-accuracy']
    values = sorted(r.metric_value for r in robust)
    assert values == pytest.approx(sorted([100 * EVAL['autoattack_acc'], 100 * EVAL['pgd_acc']]))
    aa = next(r for r in robust if 'AutoAttack' in r.metric_name)
    assert aa.metric_args == dict(threat_model='Linf', eps=pytest.approx(8 / 255), attack='AutoAttack standard',
                                  n_ex=1000)
    assert aa.metric_name == 'Robust accuracy (AutoAttack standard, Linf eps=8/255)'
    assert '| CIFAR-10 (test) | 1000 | Linf | 8/255 | 85.12 % | 49.31 % (AutoAttack standard) | 50.77 % ' \
           '(20 steps, 1 restart) |' in text
    assert 'No evaluation results' not in text and 'hf-hub:timm-edl/edlnet_resnet18.test' in text


def test_card_without_results_says_so(tmp_path):
    folder = hub.export(tiny_edlnet(), tmp_path / 'out')
    meta, text = read_card(folder)
    assert 'model-index' not in meta and 'datasets' not in meta
    assert 'No evaluation results are recorded for these weights' in text
    assert json.loads((folder / 'config.json').read_text())['timm_edl']['model_name'] == 'edlnet_resnet18.cifar10'


def test_card_copy_for_the_repository(tmp_path):
    hub.export(tiny_edlnet(), tmp_path / 'out', model_name='edlnet_resnet18.x', card_dir=tmp_path / 'cards')
    assert (tmp_path / 'cards' / 'edlnet_resnet18.x.md').read_text() == (tmp_path / 'out' / 'README.md').read_text()


def test_export_refuses_a_non_empty_folder(tmp_path):
    model = tiny_edlnet()
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='not empty'):
        hub.export(model, tmp_path / 'out')
    with pytest.raises(FileExistsError, match='notes.txt'):  # overwrite never touches foreign files
        hub.export(model, tmp_path / 'out', overwrite=True)
    assert (tmp_path / 'out' / 'notes.txt').read_text() == 'mine'
    hub.export(model, tmp_path / 'new')
    with pytest.raises(FileExistsError, match='overwrite=True'):
        hub.export(model, tmp_path / 'new')
    hub.export(model, tmp_path / 'new', overwrite=True, model_name='edlnet_resnet18.again')
    assert json.loads((tmp_path / 'new' / 'config.json').read_text())['timm_edl']['model_name'] == \
        'edlnet_resnet18.again'


@pytest.mark.parametrize('bad, match', [
    (dict(clean_acc=85.1), 'fraction'),
    (dict(n_ex=0), 'n_ex'),
    (dict(dataset=None), "'dataset'"),
    (dict(threat_model=None), 'threat_model'),
    (dict(architecture='edlnet_wrn28_10'), 'edlnet_wrn28_10'),
    (dict(weights_digest='sha256:00'), 'other weights'),
])
def test_bad_evaluation_results_are_refused(tmp_path, bad, match):
    with pytest.raises((ValueError, hub.ExportError), match=match):
        hub.export(tiny_edlnet(), tmp_path / 'out', eval_results={**EVAL, **bad})
    assert not (tmp_path / 'out').exists()


def test_evaluation_results_from_files_and_lists(tmp_path):
    path = tmp_path / 'eval.json'
    path.write_text(json.dumps({'results': [EVAL, dict(EVAL, threat_model='l2', eps=0.5, pgd_acc=None,
                                                       autoattack_acc=0.6)]}))
    clean_only = dict(dataset='cifar10', n_ex=500, clean_acc=0.9)
    results = hub.read_eval_results([path, clean_only])
    assert [r.get('threat_model') for r in results] == ['Linf', 'L2', None]
    assert 'pgd_acc' not in results[1] and results[2] == dict(dataset='cifar10', split='test', n_ex=500,
                                                             clean_acc=0.9)
    folder = hub.export(tiny_edlnet(), tmp_path / 'out', eval_results=[path, clean_only])
    meta, text = read_card(folder)
    [entry] = meta['model-index'][0]['results']  # huggingface_hub groups metrics by task and dataset
    assert entry['dataset'] == dict(name='CIFAR-10', type='cifar10', split='test')
    assert [(m['name'], m['args']['n_ex']) for m in entry['metrics']] == [
        ('Clean accuracy', 1000), ('Robust accuracy (AutoAttack standard, Linf eps=8/255)', 1000),
        ('Robust accuracy (PGD-20, Linf eps=8/255)', 1000), ('Robust accuracy (AutoAttack standard, L2 eps=0.5)', 1000),
        ('Clean accuracy', 500)]
    assert '| CIFAR-10 (test) | 1000 | L2 | 0.5 |' in text
    with pytest.raises(FileNotFoundError):
        hub.read_eval_results(tmp_path / 'missing.json')


def test_evaluation_report_fields_and_caveats(tmp_path):
    """The evaluation entry point's report: extra keys, None for attacks not run, its own eps and
    dataset labels, footnotes, and a failed gradient-masking check that the card must not hide."""
    model = tiny_edlnet()
    report = dict(EVAL, autoattack_acc=None, attack=None, version=None, eps_text='8/255', data_label='CIFAR-10-JPEG',
                  dataset='cifar10-jpeg', footnote='First 1000 of 10000 test points.', unreliable=True,
                  failed_checks=['pgd_ladder'], architecture='edlnet_resnet18', robustbench={'clean_acc': '85.12'},
                  weights_digest=hub.state_dict_digest(model), schema=1)
    folder = hub.export(model, tmp_path / 'out', eval_results=report)
    meta, text = read_card(folder)
    entry = meta['model-index'][0]['results'][0]
    assert entry['dataset'] == dict(name='CIFAR-10-JPEG', type='cifar10-jpeg', split='test')
    assert [m['name'] for m in entry['metrics']] == ['Clean accuracy', 'Robust accuracy (PGD-20, Linf eps=8/255)']
    assert '| CIFAR-10-JPEG (test) [1] | 1000 | Linf | 8/255 | 85.12 % | - | 50.77 %' in text
    assert '[1] **FAILED CHECK: pgd_ladder; the robust accuracy may be overstated. First 1000 of 10000' in text
    assert meta['datasets'] == ['cifar10']
    stored = json.loads((folder / 'config.json').read_text())['timm_edl']['evaluation'][0]
    assert stored['unreliable'] is True and 'robustbench' not in stored


def test_card_checks_comparison_and_notes(tmp_path):
    """The checks of each evaluation, another model's numbers on the same points, free notes;
    a comparison on other points is refused before anything is written."""
    ev = dict(dataset='cifar10', n_ex=1000, clean_acc=0.8, threat_model='Linf', eps=8 / 255, pgd_acc=0.5,
              autoattack_acc=0.45, checks=[dict(name='gradient', status='passed', summary='cosine 0.99'),
                                           dict(name='transfer', status='skipped', summary='no surrogate')])
    twin = dict(ev, clean_acc=0.85, pgd_acc=0.4, autoattack_acc=0.375, checks=None)
    model = tiny_edlnet()
    folder = hub.export(model, tmp_path / 'out', eval_results=[ev], compare_results={'conv twin': [twin]},
                        card_notes='## How it was trained\n\nBy hand, for this test.')
    text = (folder / 'README.md').read_text()
    assert '| `gradient` | passed | cosine 0.99 |' in text and 'not run: transfer' in text
    assert '| conv twin | CIFAR-10 (test) | 1000 | 85.00 % | 37.50 % | 40.00 % |' in text
    flagged = hub.export(model, tmp_path / 'flagged', eval_results=[ev],
                         compare_results={'twin': [dict(twin, failed_checks=['autoattack-checks'])]})
    assert '| twin (**failed check: autoattack-checks**) | CIFAR-10 (test) |' in (flagged / 'README.md').read_text()
    assert '| this model | CIFAR-10 (test) | 1000 | 80.00 % | 45.00 % | 50.00 % |' in text
    assert text.index('## How it was trained') < text.index('## Model details')
    failed = dict(ev, failed_checks=['gradient'], checks=[dict(name='gradient', status='failed', summary='cosine 0.1')])
    text = (hub.export(model, tmp_path / 'failed', eval_results=[failed]) / 'README.md').read_text()
    assert '**Failed: gradient; the robust accuracy above may be overstated.**' in text
    with pytest.raises(ValueError, match='match no evaluation'):
        hub.export(model, tmp_path / 'other', eval_results=[ev], compare_results={'twin': [dict(twin, n_ex=500)]})
    assert not (tmp_path / 'other').exists()


def test_in_chans_1_and_every_edl_option_round_trip(tmp_path):
    """Non-default in_chans, normalisation, policy and EDL options are all rebuilt from config.json."""
    edl_cfg = dict(num_steps=3, lam=0.05, lam_learnable=True, beta=0.7, beta_learnable=False, nonneg=True,
                   step_rule='learnable', eps=2e-3, normalize_atoms=False, power_iters=20, power_iters_warm=3,
                   init='zero', reweight='additive')
    model = tiny_edlnet(in_chans=1, num_classes=4, input_mean=(0.3,), input_std=(0.4,), edl_layers='blocks',
                        edl_cfg=edl_cfg, global_pool='max')
    x = images(2, 1, 28, 28)
    y = logits(model, x)
    ev = dict(dataset='fashion-mnist-small', n_ex=1000, clean_acc=0.8, threat_model='Linf', eps=0.1,
              pgd_acc=0.6)
    folder = hub.export(model, tmp_path / 'out', eval_results=ev, label_names=['a', 'b', 'c', 'd'])
    config = json.loads((folder / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [1, 28, 28]  # from the evaluated dataset
    assert config['pretrained_cfg']['mean'] == [0.0] and config['pretrained_cfg']['std'] == [1.0]
    assert config['model_args']['edl_cfg']['step_rule'] == 'learnable'
    assert (config['model_args']['edl_cfg']['init'], config['model_args']['edl_cfg']['reweight']) == ('zero', 'additive')
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert {(m.init, m.reweight) for _, m in timm_edl.layers.edl_layers(loaded)} == {('zero', 'additive')}
    assert torch.equal(logits(loaded, x), y)
    assert loaded.pretrained_cfg['label_names'] == ['a', 'b', 'c', 'd']
    assert timm.data.resolve_model_data_config(loaded)['input_size'] == (1, 28, 28)
    assert read_card(folder)[0]['datasets'] == ['fashion_mnist']
    with pytest.raises(ValueError, match='3 label_names'):
        hub.export(model, tmp_path / 'other', label_names=['a', 'b', 'c'])


def test_custom_policy_is_recorded_as_the_list_of_layers(tmp_path):
    model = tiny_edlnet(edl_layers=lambda name, conv: name.startswith('layer2'))
    x = images(2, 3, 32, 32)
    y = logits(model, x)
    folder = hub.export(model, tmp_path / 'out')
    policy = json.loads((folder / 'config.json').read_text())['model_args']['edl_layers']
    assert policy.startswith('re:') and 'layer2\\.0\\.conv1' in policy
    assert torch.equal(logits(hub.load(str(folder)), x), y)


def test_export_refuses_what_config_json_cannot_rebuild(tmp_path):
    model = tiny_edlnet()
    model.layer1[0].conv1.num_steps = 5  # one layer differs from the EDLNet's edl_cfg
    with pytest.raises(hub.ExportError, match='differ in'):
        hub.export(model, tmp_path / 'a')
    direct = edlnet.EDLResNet(widths=(8, 16, 32, 64), stem_width=8)  # not built by timm.create_model
    with pytest.raises(hub.ExportError, match='timm.create_model'):
        hub.export(direct, tmp_path / 'b')
    with pytest.raises(hub.ExportError, match='no EDL layers'):
        hub.export(timm.create_model('resnet10t'), tmp_path / 'c')
    with pytest.raises(hub.ExportError, match='features_only'):
        hub.export(timm.create_model('edlnet_resnet18', features_only=True, **TINY), tmp_path / 'd')
    with pytest.raises(ValueError, match='not a valid Hub repository name'):
        hub.export(tiny_edlnet(), tmp_path / 'e', model_name='bad--name')
    assert not any((tmp_path / d).exists() for d in 'abcde')


def test_namespace_is_defined_in_one_place():
    assert hub.HUB_NAMESPACE == 'timm-edl'
    for path in (REPO_ROOT / 'timm_edl').rglob('*.py'):
        if path.name != 'hub.py':
            assert not re.search(r"""['"]timm-edl/""", path.read_text()), f'{path} hard-codes the namespace'


# ----------------------------------------------------------------------------- loading

def test_local_dir_round_trip_gives_identical_logits(exported):
    folder, x, y = exported['folder'], exported['x'], exported['y']
    for model in (timm.create_model(f'local-dir:{folder}', pretrained=True),
                  hub.load(f'local-dir:{folder}'), hub.load(str(folder))):
        assert torch.equal(logits(model, x), y)
    single = timm.create_model('edlnet_resnet18', pretrained=True, **TINY,
                               pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors')))
    assert torch.equal(logits(single, x), y)


def test_hf_hub_offline_round_trip(exported, hub_cache):
    repo = f'{hub.HUB_NAMESPACE}/edlnet_resnet18.test'
    publish_to_cache(exported['folder'], repo, hub_cache)
    x, y = exported['x'], exported['y']
    model = timm.create_model(f'hf-hub:{repo}', pretrained=True)
    assert torch.equal(logits(model, x), y)
    assert model.pretrained_cfg['hf_hub_id'] == repo and model.pretrained_cfg['tag'] == 'test'
    assert torch.equal(logits(hub.load(f'hf-hub:{repo}'), x), y)
    assert torch.equal(logits(hub.load(f'hf-hub:{repo}@main'), x), y)
    features = hub.load(f'hf-hub:{repo}', features_only=True)
    assert [f.shape[1] for f in features(x)] == [8, 8, 16, 32, 64]
    new_head = hub.load(f'hf-hub:{repo}', num_classes=3)
    assert logits(new_head, x).shape == (3, 3)
    assert torch.equal(new_head.layer4[1].conv2.weight, exported['model'].layer4[1].conv2.weight)
    with pytest.raises(FileNotFoundError, match='offline'):
        hub.load(f'hf-hub:{hub.HUB_NAMESPACE}/not-cached')


def test_hf_hub_in_a_fresh_interpreter_with_env_vars(exported, tmp_path):
    """What a user does: HF_HUB_OFFLINE / HF_HUB_CACHE in the environment, plain timm calls."""
    repo = f'{hub.HUB_NAMESPACE}/edlnet_resnet18.test'
    cache = tmp_path / 'cache'
    publish_to_cache(exported['folder'], repo, cache)
    safetensors.torch.save_file({'x': exported['x'], 'y': exported['y']}, str(tmp_path / 'ref.safetensors'))
    script = f"""
import timm, torch, safetensors.torch
ref = safetensors.torch.load_file({str(tmp_path / 'ref.safetensors')!r})
try:
    timm.create_model('hf-hub:{repo}', pretrained=True)
except RuntimeError as e:
    assert 'Unknown model (edlnet_resnet18)' in str(e), e
    print('without import:', e)
else:
    raise SystemExit('loaded without import timm_edl?')
import timm_edl
model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()
with torch.no_grad():
    assert torch.equal(model(ref['x']), ref['y'])
import huggingface_hub.constants as c
assert c.HF_HUB_OFFLINE and c.HF_HUB_CACHE == {str(cache)!r}
print('ok')
"""
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / 'home'),
               OMP_NUM_THREADS='1')
    env.pop('HF_TOKEN', None)
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith('ok')


def test_registry_tag_without_weights(hub_cache):
    with pytest.raises(edlnet.PretrainedWeightsUnavailable, match='no pretrained weights'):
        timm.create_model('edlnet_resnet18.cifar10', pretrained=True)
    with pytest.raises(hub.PretrainedWeightsUnavailable):
        hub.load('edlnet_resnet18.cifar10')
    assert hub.load('edlnet_resnet18.cifar10', pretrained=False, **TINY).num_classes == 10


def test_unregistered_architecture_tells_to_import_timm_edl(exported, tmp_path, hub_cache):
    folder = tmp_path / 'unknown'
    shutil.copytree(exported['folder'], folder)
    config = json.loads((folder / 'config.json').read_text())
    config['architecture'] = 'edlnet_from_the_future'
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(hub.ArchitectureNotRegisteredError, match='import timm_edl'):
        hub.load(f'local-dir:{folder}')
    publish_to_cache(folder, 'someone/future', hub_cache)
    with pytest.raises(hub.ArchitectureNotRegisteredError, match="'edlnet_from_the_future'"):
        hub.load('hf-hub:someone/future')
    with pytest.raises(hub.ArchitectureNotRegisteredError):
        hub.verify_export(folder)


@pytest.mark.parametrize('damage', ['truncate', 'header', 'empty', 'pickle'])
def test_corrupt_weights_are_reported(exported, tmp_path, damage):
    folder = tmp_path / 'damaged'
    shutil.copytree(exported['folder'], folder)
    weights = folder / 'model.safetensors'
    data = weights.read_bytes()
    if damage == 'truncate':
        weights.write_bytes(data[:len(data) - 1000])
    elif damage == 'header':
        weights.write_bytes(data[:8] + b'#' + data[9:])
    elif damage == 'empty':
        weights.write_bytes(b'')
    else:
        torch.save(exported['model'].state_dict(), weights)
    expected = 'pickle' if damage == 'pickle' else 'corrupt or truncated'
    with pytest.raises(hub.CorruptCheckpointError, match=expected):
        hub.load(f'local-dir:{folder}', verify_sha256=False)
    with pytest.raises(hub.CorruptCheckpointError):
        hub.load(f'local-dir:{folder}')
    with pytest.raises(hub.CorruptCheckpointError, match=expected):
        hub.load_checkpoint(tiny_edlnet(), weights)
    with pytest.raises(hub.CorruptCheckpointError):
        hub.verify_export(folder)



def test_header_length_starting_with_0x80_is_not_mistaken_for_a_pickle(exported, tmp_path):
    """A safetensors header of 128 mod 256 bytes starts with byte 0x80, like a legacy pickle."""
    state = exported['model'].state_dict()
    weights = tmp_path / 'model.safetensors'
    for pad in range(0, 256):
        safetensors.torch.save_file(state, str(weights), metadata={'format': 'pt', 'pad': 'x' * pad})
        if weights.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail('no padding gave a header length of 128 mod 256')
    assert hub.check_safetensors_file(weights)
    hub.load_checkpoint(tiny_edlnet(), weights)


def test_corrupt_weights_in_the_timm_path(exported, tmp_path, pickle_hook):
    folder = tmp_path / 'damaged'
    shutil.copytree(exported['folder'], folder)
    weights = folder / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(hub.CorruptCheckpointError, match='truncated'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    with pytest.raises(hub.CorruptCheckpointError, match='truncated'):
        timm.create_model('edlnet_resnet18', pretrained=True, **TINY, pretrained_cfg_overlay=dict(file=str(weights)))


def test_state_dict_mismatch_lists_missing_unexpected_and_misshaped(exported, tmp_path):
    weights = exported['folder'] / 'model.safetensors'
    other = timm.create_model('edlnet_resnet18', widths=(8, 16, 32, 48), stem_width=8, edl_layers='blocks',
                              edl_cfg=dict(step_rule='learnable'))
    with pytest.raises(hub.StateDictMismatchError) as info:
        hub.load_checkpoint(other, weights)
    err = info.value
    assert 'layer1.0.conv1.step_scale' in err.missing
    assert 'conv1.beta' in err.unexpected  # the stem is a plain conv in `other`
    assert ('fc.weight', (10, 64), (10, 48)) in err.mismatched
    key, shape, own = err.mismatched[0]
    assert 'missing from the weights (16)' in str(err) and 'unexpected in the weights' in str(err)
    assert f'mis-shaped ({len(err.mismatched)}): {key} weights {list(shape)} vs model {list(own)}' in str(err)
    assert 'other edl_layers' in str(err)
    with pytest.raises(hub.StateDictMismatchError, match='mis-shaped'):
        hub.load_checkpoint(other, weights, strict=False)  # never silently skips shapes
    with pytest.raises(hub.StateDictMismatchError, match=r'layer4\.0\.conv1\.weight weights \[64, 32, 3, 3\] vs model \[32'):
        hub.load(str(exported['folder']), widths=[8, 16, 32, 32])
    before = other.fc.weight.clone()
    assert torch.equal(other.fc.weight, before)  # nothing was copied by the failed loads


# ----------------------------------------------------------------------------- pickles

class Boom:  # stands for any object a malicious pickle could construct
    def __reduce__(self):
        return (Path.touch, (Path(os.environ.get('TIMM_EDL_TEST_MARKER', '/nonexistent/marker')),))


def test_pickles_are_refused_unless_allowed(exported, tmp_path, monkeypatch):
    model, x, y = tiny_edlnet(), exported['x'], exported['y']
    path = tmp_path / 'weights.pth'
    torch.save(exported['model'].state_dict(), path)
    with pytest.raises(hub.UnsafeCheckpointError, match='allow_pickle=True'):
        hub.load_checkpoint(model, path)
    hub.load_checkpoint(model, path, allow_pickle=True)
    assert torch.equal(logits(model, x), y)
    torch.save({'state_dict': exported['model'].state_dict(), 'epoch': 3}, tmp_path / 'train.pt')
    hub.load_checkpoint(tiny_edlnet(), tmp_path / 'train.pt', allow_pickle=True)  # training checkpoints unwrap
    marker = tmp_path / 'code-ran'
    monkeypatch.setenv('TIMM_EDL_TEST_MARKER', str(marker))
    torch.save({'conv1.weight': Boom()}, tmp_path / 'evil.pth')
    with pytest.raises(hub.CorruptCheckpointError, match='weights_only'):
        hub.load_checkpoint(model, tmp_path / 'evil.pth', allow_pickle=True)
    assert not marker.exists()


def test_pickle_only_exports_are_refused(exported, tmp_path, hub_cache):
    folder = tmp_path / 'pickled'
    shutil.copytree(exported['folder'], folder)
    (folder / 'model.safetensors').unlink()
    torch.save(exported['model'].state_dict(), folder / 'pytorch_model.bin')
    with pytest.raises(hub.UnsafeCheckpointError, match='pytorch_model.bin'):
        hub.load(f'local-dir:{folder}')
    assert torch.equal(logits(hub.load(f'local-dir:{folder}', allow_pickle=True), exported['x']), exported['y'])
    publish_to_cache(folder, 'someone/pickled', hub_cache)
    with pytest.raises(hub.UnsafeCheckpointError):
        hub.load('hf-hub:someone/pickled')
    assert torch.equal(logits(hub.load('hf-hub:someone/pickled', allow_pickle=True), exported['x']), exported['y'])
    with pytest.raises(hub.UnsafeCheckpointError, match='safetensors only'):
        hub.push(folder, dry_run=True)


def test_timm_pretrained_path_refuses_pickles(exported, tmp_path, hub_cache, pickle_hook):
    """timm.create_model('edlnet_*', pretrained=True, ...) with the hook in _create_edlnet."""
    x, y = exported['x'], exported['y']
    pth = tmp_path / 'w.pth'
    torch.save(exported['model'].state_dict(), pth)
    with pytest.raises(hub.UnsafeCheckpointError, match='w.pth'):
        timm.create_model('edlnet_resnet18', pretrained=True, **TINY, pretrained_cfg_overlay=dict(file=str(pth)))
    model = timm.create_model('edlnet_resnet18', pretrained=True, **TINY, allow_pickle=True,
                              pretrained_cfg_overlay=dict(file=str(pth)))
    assert torch.equal(logits(model, x), y)
    folder = tmp_path / 'pickled'
    shutil.copytree(exported['folder'], folder)
    (folder / 'model.safetensors').unlink()
    torch.save(exported['model'].state_dict(), folder / 'pytorch_model.bin')
    with pytest.raises(hub.UnsafeCheckpointError, match='pytorch_model.bin'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    publish_to_cache(folder, 'someone/pickled', hub_cache)
    with pytest.raises(Exception) as info:  # pinned to model.safetensors: timm never falls back to the .bin
        timm.create_model('hf-hub:someone/pickled', pretrained=True)
    assert 'model.safetensors' in str(info.value) or 'cache' in str(info.value)
    assert torch.equal(logits(timm.create_model('hf-hub:someone/pickled', pretrained=True, allow_pickle=True), x), y)
    # the safe files still load through timm's own machinery
    assert torch.equal(logits(timm.create_model(f"local-dir:{exported['folder']}", pretrained=True), x), y)


def test_registry_tag_with_hub_weights_takes_edl_options_from_config(tmp_path, hub_cache, pickle_hook):
    """A published registry tag (hf_hub_id in its cfg): EDL options that are not in the state dict
    (num_steps, input normalisation) come from the repo's config.json, not the entrypoint defaults."""
    model = tiny_edlnet(edl_cfg=dict(num_steps=3, eps=0.01), input_mean=(0.5,) * 3, input_std=(0.25,) * 3)
    x = images(2, 3, 32, 32)
    y = logits(model, x)
    repo = f'{hub.HUB_NAMESPACE}/edlnet_resnet18.opts'
    publish_to_cache(hub.export(model, tmp_path / 'out', model_name='edlnet_resnet18.opts'), repo, hub_cache)
    loaded = timm.create_model('edlnet_resnet18', pretrained=True, **TINY, pretrained_cfg_overlay=dict(hf_hub_id=repo))
    assert loaded.layer1[0].conv1.num_steps == 3 and loaded.input_norm.mean.flatten().tolist() == [0.5] * 3
    assert torch.equal(logits(loaded, x), y)


def test_hook_resolves_sources_like_timm():
    """check_pretrained_source mirrors timm's private _resolve_pretrained_source order."""
    from timm.models._builder import _resolve_pretrained_source
    from timm.models import resolve_pretrained_cfg
    cases = [
        dict(pretrained_cfg_overlay=dict(file='a.safetensors', hf_hub_id='x/y')),
        dict(pretrained_cfg_overlay=dict(hf_hub_id='x/y', url='http://u/a.pth')),
        dict(pretrained_cfg_overlay=dict(url='http://u/a.pth')),
        dict(pretrained_cfg=dict(source='local-dir', file='dir', hf_hub_id='x/y')),
        dict(pretrained_cfg=dict(source='hf-hub', hf_hub_id='x/y', file='f')),
    ]
    expected = ['file', 'hf-hub', 'url', 'local-dir', 'hf-hub']
    for kwargs, want in zip(cases, expected):
        cfg = resolve_pretrained_cfg('edlnet_resnet18', kwargs.get('pretrained_cfg'),
                                     kwargs.get('pretrained_cfg_overlay')).to_dict()
        assert _resolve_pretrained_source(cfg)[0] == want
    with pytest.raises(hub.UnsafeCheckpointError, match='URL'):
        hub.check_pretrained_source('edlnet_resnet18', cases[2])
    with pytest.raises(hub.UnsafeCheckpointError):
        hub.check_pretrained_source('edlnet_resnet18', dict(pretrained_cfg_overlay=dict(file='a.bin')))
    assert hub.check_pretrained_source('edlnet_resnet18', cases[2], allow_pickle=True) == cases[2]


# ----------------------------------------------------------------------------- push / CLI

def test_push_dry_run_lists_files_without_network(exported, hub_cache, capsys):
    files = hub.push(exported['folder'], dry_run=True)
    sizes = {p.name: p.stat().st_size for p in exported['folder'].iterdir()}
    assert dict(files) == sizes
    assert push_main([str(exported['folder']), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert f'{hub.HUB_NAMESPACE}/edlnet_resnet18.test' in out and 'model.safetensors' in out
    with pytest.raises(ConnectionError, match='offline'):  # the real upload path, stopped by offline mode
        hub.push(exported['folder'], 'someone/repo')
    assert push_main([str(exported['folder']), '--repo-id', 'someone/repo']) == 1


def test_export_cli(exported, tmp_path, capsys):
    ckpt = exported['folder'] / 'model.safetensors'
    eval_json = tmp_path / 'eval.json'
    eval_json.write_text(json.dumps(dict(EVAL, weights_digest=hub.state_dict_digest(exported['model']))))
    args = ['--model', 'edlnet_resnet18', '--model-kwargs', 'widths=[8,16,32,64]', 'stem_width=8',
            '--checkpoint', str(ckpt), '--eval-results', str(eval_json), '--model-name', 'edlnet_resnet18.cli',
            '--out', str(tmp_path / 'out'), '--card-dir', str(tmp_path / 'cards')]
    assert export_main(args) == 0
    assert (tmp_path / 'cards' / 'edlnet_resnet18.cli.md').is_file()
    assert torch.equal(logits(hub.load(str(tmp_path / 'out')), exported['x']), exported['y'])
    assert export_main(args) == 2  # the folder is not empty now: a usage error
    assert 'not empty' in capsys.readouterr().err
    # re-export an export (e.g. to attach new results) from local-dir:
    assert export_main(['--model', f"local-dir:{tmp_path / 'out'}", '--out', str(tmp_path / 'again')]) == 0
    meta, text = read_card(tmp_path / 'again')
    assert 'No evaluation results' in text
    assert export_main(['--model', 'edlnet_resnet18', '--out', str(tmp_path / 'x')]) == 2
    pth = tmp_path / 'w.pth'
    torch.save(exported['model'].state_dict(), pth)
    assert export_main(['--model', 'edlnet_resnet18', '--model-kwargs', 'widths=[8,16,32,64]',
                            'stem_width=8', '--checkpoint', str(pth), '--out', str(tmp_path / 'y')]) == 2
    assert 'allow_pickle' in capsys.readouterr().err


# ----------------------------------------------------------------------------- docs

def _prepare_docs_cache(cache):
    """The repos the docs name, in the offline cache: a full-size edlnet_resnet18 (CIFAR-10
    layout, random weights) and random weights for timm's resnet18.a1_in1k."""
    torch.manual_seed(0)
    edl = timm.create_model('edlnet_resnet18').eval()
    with torch.no_grad():
        edl(torch.rand(1, 3, 32, 32))
    tmp = cache.parent / 'docs_src'
    hub.export(edl, tmp / 'edl', model_name='edlnet_resnet18.cifar10')
    publish_to_cache(tmp / 'edl', f'{hub.HUB_NAMESPACE}/edlnet_resnet18.cifar10', cache)
    resnet = timm.create_model('resnet18')
    (tmp / 'resnet').mkdir()
    safetensors.torch.save_file(resnet.state_dict(), str(tmp / 'resnet' / 'model.safetensors'))
    publish_to_cache(tmp / 'resnet', timm.models.get_pretrained_cfg('resnet18').hf_hub_id, cache)


def test_docs_snippets_run(hub_cache, tmp_path, monkeypatch):
    text = (REPO_ROOT / 'docs' / 'hub.md').read_text()
    for section in ('## Use pretrained weights', '## Convert your own model'):
        assert section in text
    blocks = re.findall(r'```python\n(.*?)```', text, re.S)
    assert len(blocks) >= 6
    _prepare_docs_cache(hub_cache)
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    namespace = {'__name__': '__docs__'}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f'docs/hub.md[python block {i}]', 'exec'), namespace)
        except Exception as e:
            raise AssertionError(f'docs/hub.md python block {i} failed:\n{code}') from e
    assert (work / 'resnet18_edl' / 'model.safetensors').is_file()
    assert isinstance(namespace['restored'].conv1, timm_edl.EDLConv2d)


def test_export_made_before_init_and_reweight_loads_and_computes_the_same():
    """tests/data/legacy_edlnet was exported by the code of commit 8a2f976, before the EDL
    layer had ``init`` / ``reweight`` (betas 0 to 0.9, so the options matter), with its
    input and logits: loaded today, every path rebuilds the original layer and the logits."""
    folder = REPO_ROOT / 'tests' / 'data' / 'legacy_edlnet'
    expected = safetensors.torch.load_file(str(folder / 'expected.safetensors'))
    config = json.loads((folder / 'export' / 'config.json').read_text())
    assert 'init' not in config['model_args']['edl_cfg'] and 'reweight' not in config['model_args']['edl_cfg']
    for model in (timm.create_model(f"local-dir:{folder / 'export'}", pretrained=True),
                  hub.load(f"local-dir:{folder / 'export'}")):
        layers = timm_edl.layers.edl_layers(model)
        assert {(m.init, m.reweight, m.eps) for _, m in layers} == {('zero', 'floor', 1e-3)}
        assert sorted({round(float(m.beta.detach()), 3) for _, m in layers}) == [0.0, 0.3, 0.5, 0.6, 0.9]
        torch.testing.assert_close(logits(model, expected['x']), expected['logits'], rtol=0, atol=1e-6)
    # a model built today (new defaults) computes something else at these betas: the check has teeth
    today = timm.create_model('edlnet_resnet18', layers=(1, 1), widths=(4, 8), stem_width=4, num_classes=3)
    state = safetensors.torch.load_file(str(folder / 'export' / 'model.safetensors'))
    today.load_state_dict(state)
    assert not torch.allclose(logits(today, expected['x']), expected['logits'], atol=1e-3)


# ----------------------------------------------------------------------------- one weights path, one spec error

def test_load_checkpoint_keeps_the_head_only_when_asked(exported):
    """timm's fine-tuning rule, in the one function that loads weights: a classifier trained for
    another number of classes stays as built with ``new_head=True``, and is an error otherwise."""
    weights = exported['folder'] / 'model.safetensors'
    model = tiny_edlnet(num_classes=3)
    head = model.fc.weight.detach().clone()
    with pytest.raises(hub.StateDictMismatchError, match=r'fc\.weight weights \[10, 64\] vs model \[3, 64\]'):
        hub.load_checkpoint(model, weights)
    assert hub.load_checkpoint(model, weights, new_head=True) == ['fc.weight', 'fc.bias']
    assert torch.equal(model.fc.weight, head)
    assert torch.equal(model.layer4[1].conv2.weight, exported['model'].layer4[1].conv2.weight)
    assert hub.load_checkpoint(tiny_edlnet(), weights, new_head=True) == []  # same classes: the head loads


def test_one_model_spec_error_for_every_command():
    from timm_edl.evaluation import EvaluationError, load_model
    from timm_edl.evaluation import models as evaluation_models
    assert evaluation_models.ModelSpecError is hub.ModelSpecError and issubclass(hub.ModelSpecError, ValueError)
    with pytest.raises(hub.ModelSpecError, match="unknown model 'edlnet_resnet19'"):
        hub.resolve_model('edlnet_resnet19')
    with pytest.raises(EvaluationError, match="unknown model 'edlnet_resnet19'") as info:
        load_model('edlnet_resnet19')
    assert isinstance(info.value.__cause__, hub.ModelSpecError)

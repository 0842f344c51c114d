"""timm_edl.convert: conv -> EDL conversion of timm / torchvision CNNs, the function-preserving
setting, the timm API after conversion, switching to the EDL regime, and the conversion
block that the ``edl_converted`` architecture applies, so that timm's own loaders (and
timm_edl.hub.load) rebuild a converted model from its export."""
import json
import shutil

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torchvision

import timm
from timm_edl import EDLConv2d, hub, set_beta_mode
from conftest import publish_to_cache
from timm_edl.cli.convert import main as convert_main
from timm_edl.convert import (
    PRESERVE_FUNCTION, apply_conversion, conversion_config, convert_to_edl, edl_layer_config,
    select_convs, set_edl_options,
)
from timm_edl.layers import edl_layers, operator_norm_sq

TINY = dict(widths=(8, 16, 32, 64), stem_width=8)


def randomize_bn(model, seed=1):
    """Non-trivial BN statistics and affine maps (timm zero-inits the last BN of each block,
    which would hide a wrong conversion of the convs feeding it)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
    return model


def out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


MODELS = {
    'resnet18': lambda: timm.create_model('resnet18', num_classes=10),
    'resnet50': lambda: timm.create_model('resnet50', num_classes=10),
    'wide_resnet50_2': lambda: timm.create_model('wide_resnet50_2', num_classes=10),
    'edlnet_wrn28_10_twin': lambda: timm.create_model('edlnet_wrn28_10', edl_layers='none'),  # RobustBench WRN
    'torchvision_resnet18': lambda: torchvision.models.resnet18(num_classes=10),
}


@pytest.mark.parametrize('name', list(MODELS))
def test_preserve_function_keeps_the_logits(name):
    torch.manual_seed(0)
    model = randomize_bn(MODELS[name]())
    x = images(2, 3, 16 if 'wrn' in name else 32, 16 if 'wrn' in name else 32)
    reference = out(model, x)
    chosen = select_convs(model, 'default')
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convert_to_edl(model, 'default', preserve_function=True)
    assert [n for n, _ in edl_layers(model)] == chosen and len(chosen) > 0
    assert all(max(m.kernel_size) == 1 for m in model.modules() if type(m) is nn.Conv2d)  # 1x1 stay plain
    assert [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == bns  # the same BN modules
    assert rel_err(out(model, x), reference) <= 1e-4


def test_preserve_function_with_every_conv_and_conv_bias():
    model = nn.Sequential(nn.Conv2d(3, 6, 5, stride=2, padding=2, bias=True), nn.ReLU(),
                          nn.Conv2d(6, 4, 1, bias=True), nn.Conv2d(4, 4, 3, groups=2, padding=1))
    x = images(2, 3, 11, 9)
    reference = out(model, x)
    convert_to_edl(model, 'all', preserve_function=True, beta_learnable=False, lam_learnable=True)
    assert isinstance(model[0], EDLConv2d) and isinstance(model[2], EDLConv2d)
    assert type(model[3]) is nn.Conv2d  # grouped convs are never converted
    assert torch.equal(model[0].bias, model[0].bias) and model[0].bias is not None
    assert rel_err(out(model, x), reference) <= 1e-5


def test_policies_select_the_documented_convs():
    model = timm.create_model('resnet18')
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert select_convs(model, 'all') == convs
    assert select_convs(model, 'stem') == ['conv1']
    assert 'conv1' not in select_convs(model, 'blocks') and 'layer1.0.conv1' in select_convs(model, 'blocks')
    assert select_convs(model, 'none') == []
    partly = convert_to_edl(timm.create_model('resnet18'), 'stem')
    assert select_convs(partly, 'stem') == [] and 'layer1.0.conv1' in select_convs(partly, 'blocks')
    assert select_convs(model, 're:^layer2') == [n for n in convs if n.startswith('layer2')]
    assert select_convs(model, lambda n, m: m.stride == (2, 2)) == [
        n for n in convs if model.get_submodule(n).stride == (2, 2)]
    assert 'layer2.0.downsample.0' in select_convs(model, 'all')
    assert 'layer2.0.downsample.0' not in select_convs(model, 'default')
    convert_to_edl(model, 'stem', preserve_function=True)
    assert [n for n, _ in edl_layers(model)] == ['conv1']
    with pytest.raises(ValueError, match='unknown edl policy'):
        select_convs(model, 'everything')


def test_preserve_function_refuses_settings_that_change_the_function():
    model = timm.create_model('resnet18')
    with pytest.raises(ValueError, match='num_steps'):
        convert_to_edl(model, preserve_function=True, num_steps=2)
    with pytest.raises(ValueError, match='normalize_atoms'):
        convert_to_edl(model, preserve_function=True, normalize_atoms=True)
    with pytest.raises(ValueError, match='copy_weights'):
        convert_to_edl(model, copy_weights=False, preserve_function=True)
    with pytest.raises(ValueError, match='unknown EDL option'):
        convert_to_edl(model, num_stepz=2)
    assert not edl_layers(model)
    convert_to_edl(model, preserve_function=True, **PRESERVE_FUNCTION)  # restating the setting is fine
    assert all(edl_layer_config(m)['num_steps'] == 1 for _, m in edl_layers(model))


def test_default_conversion_uses_the_given_edl_options():
    model = timm.create_model('resnet18')
    weight = model.layer1[0].conv1.weight.detach().clone()
    convert_to_edl(model, 'default', num_steps=3, lam=0.05)
    layer = model.layer1[0].conv1
    assert isinstance(layer, EDLConv2d) and layer.num_steps == 3 and float(layer.lam) == pytest.approx(0.05)
    assert torch.equal(layer.weight, weight)  # the dictionary starts from the conv weights
    assert layer.normalize and layer.fixed_lipschitz == 0.0  # EDLConv2d's defaults otherwise


def test_timm_api_is_kept():
    torch.manual_seed(0)
    original = randomize_bn(timm.create_model('resnet18', num_classes=10)).eval()
    model = randomize_bn(timm.create_model('resnet18', num_classes=10)).eval()
    model.load_state_dict(original.state_dict())
    convert_to_edl(model, preserve_function=True)
    x = images(2, 3, 32, 32)
    with torch.no_grad():
        f0, f1 = original.forward_features(x), model.forward_features(x)
        assert rel_err(f1, f0) <= 1e-5
        assert rel_err(model.forward_head(f1, pre_logits=True), original.forward_head(f0, pre_logits=True)) <= 1e-5
        for a, b in zip(model.forward_intermediates(x, intermediates_only=True),
                        original.forward_intermediates(x, intermediates_only=True)):
            assert rel_err(a, b) <= 1e-5
    model.reset_classifier(3)
    assert out(model, x).shape == (2, 3)
    feats = randomize_bn(timm.create_model('resnet18', features_only=True, out_indices=(1, 3))).eval()
    reference = [f.clone() for f in out(feats, x)]
    convert_to_edl(feats, preserve_function=True)
    assert isinstance(feats.conv1, EDLConv2d)
    for a, b in zip(out(feats, x), reference):
        assert rel_err(a, b) <= 1e-5
    assert feats.feature_info.channels() == [64, 256]


def test_switch_to_the_edl_regime():
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model('resnet18', num_classes=10))
    convert_to_edl(model, preserve_function=True)
    x = images(2, 3, 32, 32)
    before = out(model, x)
    set_edl_options(model, num_steps=2, lam=0.1, fixed_lipschitz=None)
    set_beta_mode(model, 'vanilla')
    layer = model.layer1[0].conv1
    assert layer.num_steps == 2 and float(layer.lam) == pytest.approx(0.1) and layer.fixed_lipschitz == 0.0
    after = out(model, x)
    assert torch.isfinite(after).all() and rel_err(after, before) > 1e-3  # the function changes
    size = layer.lipschitz_size.tolist()  # L = ||A||^2 of the (unnormalised) conv at the input size
    reference, _ = operator_norm_sq(layer.weight.detach(), size, layer.stride, layer.padding, num_iters=300)
    assert size == [8, 8] and float(layer.lipschitz) == pytest.approx(float(reference), rel=0.1)
    set_edl_options(model, step_rule='learnable', normalize_atoms=True)
    assert isinstance(layer.step_scale, nn.Parameter) and layer.normalize
    set_beta_mode(model, 'elastic')
    model.train()
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    assert layer.beta.grad is not None and layer.step_scale.grad is not None
    with pytest.raises(ValueError, match='set_beta_mode'):
        set_edl_options(model, beta=0.5)
    with pytest.raises(ValueError, match='num_steps'):
        set_edl_options(model, num_steps=0)
    with pytest.raises(ValueError, match='no EDLConv2d'):
        set_edl_options(timm.create_model('resnet10t'), num_steps=2)


def test_conversion_block_round_trip_with_mixed_layer_options():
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model('resnet18', num_classes=10))
    convert_to_edl(model, 'stem', preserve_function=True)
    convert_to_edl(model, 'blocks', num_steps=2, lam=0.05, step_rule='safe')
    block = json.loads(json.dumps(conversion_config(model)))  # JSON-able
    assert block['layers'][0] == 'conv1' and len(block['layers']) == 17
    assert block['layer_overrides']['layer1.0.conv1']['num_steps'] == 2
    fresh = apply_conversion(timm.create_model('resnet18', num_classes=10), block)
    assert {n: edl_layer_config(m, values=False) for n, m in edl_layers(fresh)} == \
        {n: edl_layer_config(m, values=False) for n, m in edl_layers(model)}
    with pytest.raises(ValueError, match='layer1.0.conv1'):
        apply_conversion(timm.create_model('resnet18'), dict(block, layers=['layer1.0.conv1', 'layer1.0.conv1']))
    with pytest.raises(ValueError, match='missing'):
        apply_conversion(timm.create_model('resnet18'), dict(block, layers=['nope']))


def test_converted_timm_model_export_and_load(tmp_path):
    model, x, y, folder = _converted_export(tmp_path)
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'edl_converted' and config['model_args']['num_classes'] == 10
    assert config['model_args']['base_model'] == 'resnet18'
    assert config['timm_edl']['model_name'] == 'resnet18_edl.a1_in1k'
    assert config['model_args']['conversion']['layers'] == [n for n, _ in edl_layers(model)]
    restored = hub.load(f'local-dir:{folder}')
    assert torch.equal(out(restored, x), y)
    assert tuple(restored.pretrained_cfg['mean']) == tuple(model.pretrained_cfg['mean'])
    assert 'hub.load' in (folder / 'README.md').read_text()
    plain = timm.create_model(f'local-dir:{folder}', pretrained=True)  # timm alone rebuilds the converted net
    assert type(plain) is type(model) and torch.equal(out(plain, x), y)
    feats = hub.load(f'local-dir:{folder}', features_only=True, out_indices=(2, 4))
    assert [f.shape[1] for f in out(feats, x)] == [128, 512]
    with pytest.raises(hub.ExportError, match='timm.create_model'):
        hub.export(convert_to_edl(torchvision.models.resnet18(), preserve_function=True), tmp_path / 'tv')


def test_converted_conv_twin_exports_its_layer_list(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model('edlnet_resnet18', edl_layers='none', **TINY))
    convert_to_edl(model, 'default', preserve_function=True)
    x = images(2, 3, 32, 32)
    y = out(model, x)
    folder = hub.export(model, tmp_path / 'out')
    args = json.loads((folder / 'config.json').read_text())['model_args']
    assert args['edl_layers'].startswith('re:') and args['edl_cfg']['fixed_lipschitz'] == 1.0
    assert args['edl_cfg']['lam'] == 0.0
    assert 'function-preserving setting' in (folder / 'README.md').read_text()
    assert torch.equal(out(timm.create_model(f'local-dir:{folder}', pretrained=True), x), y)


def _offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants
    cache = tmp_path / 'hf_cache'
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return cache


def test_convert_cli(tmp_path, monkeypatch, capsys):
    cache = _offline_cache(tmp_path, monkeypatch)
    torch.manual_seed(0)
    source = randomize_bn(timm.create_model('resnet18'))
    weights = tmp_path / 'resnet18.safetensors'
    safetensors.torch.save_file(source.state_dict(), str(weights))
    # timm's own pretrained weights, served from the offline Hub cache
    repo_id = timm.models.get_pretrained_cfg('resnet18').hf_hub_id
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(weights, snapshot / 'model.safetensors')
    (snapshot.parent.parent / 'refs').mkdir()
    (snapshot.parent.parent / 'refs' / 'main').write_text('0' * 40)

    assert convert_main(['--model', 'resnet18', '--pretrained', '--out', str(tmp_path / 'a')]) == 0
    printed = capsys.readouterr().out
    assert 'converted 17 convolution(s)' in printed and 'max |logit difference| / max |logit|' in printed
    x = images(2, 3, 32, 32)
    restored = hub.load(str(tmp_path / 'a'))
    assert rel_err(out(restored, x), out(source, x)) <= 1e-4
    assert torch.equal(restored.conv1.weight, source.conv1.weight)

    assert convert_main(['--model', 'resnet18', '--checkpoint', str(weights), '--policy', 'stem', '--mode', 'edl',
                         '--edl-cfg', 'num_steps=3', 'beta_learnable=false', '--model-name', 'resnet18_stem',
                         '--out', str(tmp_path / 'b')]) == 0
    config = json.loads((tmp_path / 'b' / 'config.json').read_text())
    block = config['model_args']['conversion']
    assert block['layers'] == ['conv1'] and block['edl_cfg']['num_steps'] == 3
    assert block['edl_cfg']['beta_learnable'] is False and block['edl_cfg']['normalize_atoms'] is True
    assert config['timm_edl']['model_name'] == 'resnet18_stem'
    assert torch.equal(hub.load(str(tmp_path / 'b')).layer1[0].conv1.weight, source.layer1[0].conv1.weight)

    assert convert_main(['--model', 'resnet18', '--out', str(tmp_path / 'b')]) == 2  # not empty: a usage error
    assert 'not empty' in capsys.readouterr().err
    assert convert_main(['--model', 'resnet18', '--policy', 're:^nothing$', '--out', str(tmp_path / 'c')]) == 2
    assert 'selects no convertible' in capsys.readouterr().err


def test_conversion_blocks_recorded_before_init_and_reweight_keep_the_original_layer():
    """A conversion block spells out every layer option; one written before ``init`` /
    ``reweight`` existed rebuilds layers that start from 0 with the floored weights."""
    from timm_edl.convert import apply_conversion
    old = {'format': 1, 'layers': ['conv1'], 'edl_cfg': dict(
        num_steps=2, beta_learnable=True, lam_learnable=False, step_rule='fixed', eps=1e-3, nonneg=False,
        normalize_atoms=True, bias=False, power_iters=30, power_iters_warm=2, fixed_lipschitz=None)}
    model = apply_conversion(timm.create_model('resnet18', num_classes=3), old)
    assert (model.conv1.init, model.conv1.reweight, model.conv1.eps) == ('zero', 'floor', 1e-3)
    new = {**old, 'edl_cfg': {**old['edl_cfg'], 'init': 'ista', 'reweight': 'scale_free', 'eps': 0.1}}
    model = apply_conversion(timm.create_model('resnet18', num_classes=3), new)
    assert (model.conv1.init, model.conv1.reweight, model.conv1.eps) == ('ista', 'scale_free', 0.1)
    # options given by a user (not spelled out) get today's defaults
    assert timm.create_model('edlnet_resnet18', edl_cfg=dict(beta=0.5)).conv1.reweight == 'scale_free'


# ----------------------------------------------------------------------------- timm's own loaders

def _converted_export(tmp_path):
    """A resnet18 converted with two sets of layer options, its export and its logits."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model('resnet18', num_classes=10))
    convert_to_edl(model, 'stem', preserve_function=True)
    convert_to_edl(model, 'blocks', num_steps=2, lam=0.05)
    x = images(2, 3, 32, 32)
    return model, x, out(model, x), hub.export(model, tmp_path / 'export')


def test_converted_export_loads_through_timm_hf_hub_offline(tmp_path, hub_cache):
    model, x, y, folder = _converted_export(tmp_path)
    repo = 'someone/resnet18_edl'
    publish_to_cache(folder, repo, hub_cache)
    loaded = timm.create_model(f'hf-hub:{repo}', pretrained=True)
    assert type(loaded) is type(model) and torch.equal(out(loaded, x), y)
    assert loaded.pretrained_cfg['hf_hub_id'] == repo and loaded.pretrained_cfg['architecture'] == 'edl_converted'
    assert torch.equal(out(hub.load(f'hf-hub:{repo}'), x), y)
    new_head = timm.create_model(f'hf-hub:{repo}', pretrained=True, num_classes=3)  # timm's fine-tuning rule
    assert out(new_head, x).shape == (2, 3)
    assert torch.equal(new_head.layer4[1].conv2.weight, model.layer4[1].conv2.weight)


def test_convert_cli_export_loads_through_timm_local_dir(tmp_path):
    """``timm-edl convert --model resnet18 --out DIR``: plain timm rebuilds the converted network."""
    torch.manual_seed(0)
    source = randomize_bn(timm.create_model('resnet18'))
    weights = tmp_path / 'resnet18.safetensors'
    safetensors.torch.save_file(source.state_dict(), str(weights))
    folder = tmp_path / 'resnet18_edl'
    assert convert_main(['--model', 'resnet18', '--checkpoint', str(weights), '--out', str(folder)]) == 0
    assert json.loads((folder / 'config.json').read_text())['model_args']['base_model'] == 'resnet18'
    x = images(2, 3, 32, 32)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert len(edl_layers(loaded)) == 17
    assert rel_err(out(loaded, x), out(source, x)) <= 1e-4  # the function-preserving conversion of `source`
    assert torch.equal(out(loaded, x), out(hub.load(str(folder)), x))


def test_exports_naming_the_base_architecture_still_load(tmp_path):
    """Exports of earlier releases: ``architecture: resnet18`` plus a ``timm_edl_conversion`` block."""
    model, x, y, folder = _converted_export(tmp_path)
    config = json.loads((folder / 'config.json').read_text())
    args = dict(config['model_args'])
    old = dict(config, architecture=args.pop('base_model'), timm_edl_conversion=args.pop('conversion'), model_args=args)
    (folder / 'config.json').write_text(json.dumps(old))
    assert torch.equal(out(hub.load(str(folder)), x), y)
    assert torch.equal(out(hub.resolve_model(str(folder / 'model.safetensors'))[0], x), y)
    assert hub.verify_export(folder)['architecture'] == 'resnet18'


def test_edl_converted_checks_its_arguments_and_weights(tmp_path):
    with pytest.raises(ValueError, match='base_model=<timm architecture name> and conversion='):
        timm.create_model('edl_converted')
    with pytest.raises(ValueError, match='not a timm architecture'):
        timm.create_model('edl_converted', base_model='resnet_nope', conversion={'layers': [], 'edl_cfg': {}})
    model, x, y, folder = _converted_export(tmp_path)
    (folder / 'model.safetensors').unlink()
    torch.save(model.state_dict(), folder / 'pytorch_model.bin')
    with pytest.raises(hub.UnsafeCheckpointError, match='pytorch_model.bin'):  # the pickle gate, as for EDLNets
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert torch.equal(out(timm.create_model(f'local-dir:{folder}', pretrained=True, allow_pickle=True), x), y)

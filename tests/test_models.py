"""The timm model API for the EDLNet family, checked the way timm's own model tests check it.

Registration, pretrained cfgs and weights handling, forward_features / forward_head /
classifier reset, in_chans, gradient checkpointing, group_matcher, feature extraction
(features_only, forward_intermediates, pruning, torch.fx), TorchScript, gradients, the
``edl_layers`` / ``edl_cfg`` options, input normalisation, determinism and state dicts.

Most checks use the small archs (ResNet-18 with CIFAR / ImageNet stem, PreAct ResNet-18)
with a cheap step-size estimate (``power_iters=5``, see ``make_edlnet`` in conftest.py);
the big ones get construction, parameter counts, feature_info and one batch-1 forward.
"""
import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import timm
import timm_edl
from timm.layers import set_layer_config
from timm.models import get_pretrained_cfg, group_modules, group_parameters
from timm_edl.layers import EDLConv2d, edl_layers, operator_norm_sq, set_beta_mode
from timm_edl.models import edlnet as edlnet_module
from timm_edl.models.edlnet import PretrainedWeightsUnavailable, tags_with_weights

# arch -> (tags, parameters of the conv twin (edl_layers='none'), EDL layers under 'default',
#          num_features, stage channels incl. the stem tap, stage reductions incl. the stem tap)
# Twin counts are those of the reference nets: CIFAR ResNet-18/34/50 (3x3 stem, 10 classes),
# the RobustBench PreAct ResNet-18 (with final BN) and WRN-28-10 / WRN-34-10; the ImageNet-stem
# ones (200 classes for the default tiny_imagenet tag) are also checked against timm's resnet.
# edlnet_resnet8_in (the zoo's; EDL layers in the blocks by default): 79,962 = stem 7x7x3x16 + BN
# (2,384) + layer1 (4,672) + layer2 with its 1x1 shortcut (14,528) + layer3 (57,728) + fc (650).
# edlnet_resnet20 (He et al.'s CIFAR ResNet-20, EDL layers in the blocks): 272,474 = stem 3x3x3x16 + BN
# (464) + layer1 (3 x 4,672) + layer2 (14,528 + 2 x 18,560) + layer3 (57,728 + 2 x 73,984) + fc (650);
# edlnet_resnet20_conv and edlnet_resnet8_in_conv are conv twins, with no EDL layer.
ARCHS = {
    'edlnet_resnet20': (('cifar10_jpeg_fast_linf', 'cifar10', 'cifar100'), 272_474, 18, 64, (16, 16, 32, 64), (1, 1, 2, 4)),
    'edlnet_resnet20_conv': (('cifar10_jpeg_fast_linf', 'cifar10', 'cifar100'), 272_474, 0, 64, (16, 16, 32, 64), (1, 1, 2, 4)),
    'edlnet_resnet8_in': (('cifar10_jpeg_pgd_linf', 'fashion_mnist_pgd_linf', 'cifar10_jpeg_smooth_sigma25'), 79_962, 6, 64,
                          (16, 16, 32, 64), (2, 4, 8, 16)),
    'edlnet_resnet8_in_conv': (('cifar10_jpeg_smooth_sigma25', 'cifar10', 'cifar100'), 79_962, 0, 64, (16, 16, 32, 64), (2, 4, 8, 16)),
    'edlnet_resnet18': (('cifar10', 'cifar100'), 11_173_962, 17, 512,
                        (64, 64, 128, 256, 512), (1, 1, 2, 4, 8)),
    'edlnet_resnet34': (('cifar10', 'cifar100'), 21_282_122, 33, 512,
                        (64, 64, 128, 256, 512), (1, 1, 2, 4, 8)),
    'edlnet_resnet50': (('cifar10', 'cifar100'), 23_520_842, 17, 2048,
                        (64, 256, 512, 1024, 2048), (1, 1, 2, 4, 8)),
    'edlnet_preact_resnet18': (('cifar10', 'cifar100'), 11_172_170, 17, 512,
                               (64, 64, 128, 256, 512), (1, 1, 2, 4, 8)),
    'edlnet_wrn28_10': (('cifar10', 'cifar100'), 36_479_194, 25, 640,
                        (16, 160, 320, 640), (1, 1, 2, 4)),
    'edlnet_wrn34_10': (('cifar10', 'cifar100'), 46_160_474, 31, 640,
                        (16, 160, 320, 640), (1, 1, 2, 4)),
    'edlnet_resnet18_in': (('tiny_imagenet', 'in1k'), 11_279_112, 17, 512,
                           (64, 64, 128, 256, 512), (2, 4, 8, 16, 32)),
    'edlnet_resnet50_in': (('tiny_imagenet', 'in1k'), 23_917_832, 17, 2048,
                           (64, 256, 512, 1024, 2048), (2, 4, 8, 16, 32)),
}
TIMM_REFERENCE = {'edlnet_resnet18_in': 'resnet18', 'edlnet_resnet50_in': 'resnet50'}
ALL_ARCHS = list(ARCHS)
ALL_TAGGED = [f'{arch}.{tag}' for arch, spec in ARCHS.items() for tag in spec[0]]
SMALL = ['edlnet_resnet18', 'edlnet_preact_resnet18', 'edlnet_resnet18_in']
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

def _input(model: nn.Module, batch: int = 2, in_chans=None, seed: int = 0) -> torch.Tensor:
    """Random [0, 1] images at the model's cfg input size."""
    c, h, w = model.pretrained_cfg['input_size']
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, in_chans or model.in_chans, h, w, generator=g)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _convs(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, EDLConv2d))}


def _stem_tap(name: str) -> str:
    return 'conv1' if 'preact' in name else 'act1'


# ======================================================================= registration


def test_list_models_after_import():
    assert timm.list_models('edlnet*') == sorted(ALL_ARCHS, key=timm.models._registry._natural_key)
    assert set(timm.list_models('edlnet*', include_tags=True)) == set(ALL_TAGGED)
    # list_pretrained lists exactly the tags with published weights (none yet)
    assert set(timm.list_pretrained('edlnet*')) == set(tags_with_weights())
    for name in timm.list_pretrained('edlnet*'):
        assert name in ALL_TAGGED
    for arch, spec in ARCHS.items():  # the first tag is the default one
        assert get_pretrained_cfg(arch).tag == spec[0][0]


def test_registration_happens_only_on_import():
    code = textwrap.dedent("""
        import timm
        assert timm.list_models('edlnet*') == [], timm.list_models('edlnet*')
        try:
            timm.create_model('edlnet_resnet18')
        except RuntimeError as e:
            assert 'Unknown model' in str(e), e
        else:
            raise AssertionError('edlnet_resnet18 was created without import timm_edl')
        import timm_edl
        print(len(timm.list_models('edlnet*')))
    """)
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(len(ARCHS))


def test_unknown_model_raises():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('edlnet_nope')


# ======================================================================= pretrained cfgs


@pytest.mark.parametrize('name', ALL_TAGGED)
def test_default_cfg_fields(name):
    arch, tag = name.split('.')
    cfg = get_pretrained_cfg(name)
    assert cfg is not None and cfg.architecture == arch and cfg.tag == tag
    c, h, w = cfg.input_size
    assert c == (1 if tag.startswith('fashion_mnist') else 3) and h == w > 0
    assert cfg.num_classes == {'cifar10': 10, 'cifar100': 100, 'tiny_imagenet': 200, 'in1k': 1000,
                               'cifar10_jpeg_pgd_linf': 10, 'fashion_mnist_pgd_linf': 10, 'cifar10_jpeg_fast_linf': 10,
                               'cifar10_jpeg_smooth_sigma25': 10}[tag]
    assert tuple(cfg.mean) == (0.0,) * c and tuple(cfg.std) == (1.0,) * c
    assert cfg.license and cfg.paper_ids
    assert cfg.first_conv == 'conv1' and cfg.classifier == 'fc'
    assert len(cfg.pool_size) == 2
    # the registry serves what the module's generate_default_cfgs produced
    own = edlnet_module.default_cfgs[arch].cfgs[tag]
    for field in ('input_size', 'num_classes', 'mean', 'std', 'pool_size', 'license', 'paper_ids'):
        assert getattr(own, field) == getattr(cfg, field), field


def test_default_cfgs_cover_all_archs():
    assert set(edlnet_module.default_cfgs) == set(ALL_ARCHS)
    for arch, spec in ARCHS.items():
        assert tuple(edlnet_module.default_cfgs[arch].tags) == spec[0]


@pytest.mark.parametrize('name', ALL_TAGGED)
def test_forward_features_pool_size(name, make_edlnet):
    """Unpooled features: (B, num_features, *pool_size) at the cfg input size; head gives num_classes."""
    model = make_edlnet(name, edl_cfg=dict(power_iters=2))
    cfg = model.pretrained_cfg
    assert cfg['tag'] == name.split('.')[1]
    assert model.num_classes == cfg['num_classes']
    x = _input(model, batch=1)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, model.num_features, *cfg['pool_size'])
        logits = model.forward_head(feats)
    assert logits.shape == (1, cfg['num_classes'])
    assert torch.isfinite(logits).all()
    # first_conv / classifier name real state-dict keys
    sd = model.state_dict()
    assert sd[cfg['first_conv'] + '.weight'].shape[1] == cfg['input_size'][0]
    assert sd[cfg['classifier'] + '.weight'].shape[0] == cfg['num_classes']
    assert sd[cfg['classifier'] + '.bias'].shape[0] == cfg['num_classes']


# ======================================================================= construction, sizes


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_construction_param_count_feature_info(arch, make_edlnet):
    tags, twin_params, n_edl, num_features, chans, reds = ARCHS[arch]
    model = make_edlnet(arch, edl_cfg=dict(power_iters=2))
    assert isinstance(model, edlnet_module.EDLResNet)
    assert model.num_features == model.head_hidden_size == num_features
    assert len(edl_layers(model)) == n_edl
    # EDL adds exactly one learnable beta per layer to the reference network
    assert _count(model) == twin_params + n_edl
    twin = make_edlnet(arch, edl_layers='none')
    assert _count(twin) == twin_params
    if arch in TIMM_REFERENCE:
        ref = timm.create_model(TIMM_REFERENCE[arch], num_classes=model.num_classes)
        assert _count(ref) == twin_params
    # feature_info: >= 3 levels, the expected channels, non-decreasing reductions
    info = model.feature_info
    assert len(info) >= 3
    assert [f['num_chs'] for f in info] == list(chans)
    assert [f['reduction'] for f in info] == list(reds)
    assert all(a <= b for a, b in zip(reds, reds[1:]))
    assert info[-1]['num_chs'] == num_features
    for f in info:
        model.get_submodule(f['module'])  # names a real module
    # one tiny forward
    x = _input(model, batch=1)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


# ======================================================================= head / classifier


@pytest.mark.parametrize('name', SMALL)
def test_head_and_classifier_reset(name, make_edlnet):
    model = make_edlnet(name)
    x = _input(model)
    b = x.shape[0]
    pool = model.pretrained_cfg['pool_size']
    assert model.num_classes == (200 if name.endswith('_in') else 10)
    clf = model.get_classifier()
    assert isinstance(clf, nn.Linear) and clf.out_features == model.num_classes
    assert clf.in_features == model.num_features
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (b, model.head_hidden_size)
        assert torch.allclose(pre, feats.mean((2, 3)), atol=1e-6)
        assert torch.allclose(model.forward_head(feats), clf(pre), atol=1e-5)

        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == (b, model.num_features)
        assert torch.allclose(out, pre, atol=1e-6)

        model.reset_classifier(0, '')
        out = model(x)
        assert out.shape == (b, model.num_features, *pool)
        assert torch.allclose(out, feats, atol=1e-6)

        model.reset_classifier(7, 'avg')  # the pooling is kept unless given (timm's rule)
        assert model.num_classes == 7 and model.get_classifier().out_features == 7
        assert model(x).shape == (b, 7)
        model.eval().reset_classifier(5)
        assert model(x).shape == (b, 5) and not model.get_classifier().training

    headless = make_edlnet(name, num_classes=0, global_pool='')
    with torch.no_grad():
        out = headless(x)
    assert headless.num_classes == 0
    assert out.shape == (b, headless.num_features, *pool)
    pooled = make_edlnet(name, num_classes=0)
    with torch.no_grad():
        assert pooled(x).shape == (b, pooled.num_features)


@pytest.mark.parametrize('name', ALL_ARCHS)
def test_factory_device_and_dtype(name):
    """timm's factory kwargs: every tensor is created on ``device`` (meta: no memory), float
    parameters in ``dtype``; the network runs there, and a new head follows the model."""
    model = timm.create_model(name, device='meta', dtype=torch.float64).eval()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert all(t.device.type == 'meta' for _, t in tensors), [n for n, t in tensors if t.device.type != 'meta'][:5]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    c, h, w = model.pretrained_cfg['input_size']
    out = model(torch.empty(2, c, h, w, device='meta', dtype=torch.float64))
    assert out.shape == (2, model.num_classes) and out.dtype == torch.float64
    model.reset_classifier(3)
    fc = model.get_classifier()
    assert fc.weight.device.type == 'meta' and fc.weight.dtype == torch.float64 and not fc.training


# ======================================================================= in_chans


@pytest.mark.parametrize('in_chans', [1, 4])
@pytest.mark.parametrize('name', ['edlnet_resnet18', 'edlnet_resnet18_in'])
def test_in_chans(name, in_chans, make_edlnet):
    model = make_edlnet(name, in_chans=in_chans)
    assert model.in_chans == in_chans
    assert model.state_dict()['conv1.weight'].shape[1] == in_chans
    x = _input(model, in_chans=in_chans)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=rf'\(B, {in_chans}, H, W\)'):
        model(_input(model, in_chans=3))


def test_default_model_rejects_wrong_channels(make_edlnet):
    model = make_edlnet()
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model(torch.rand(3, 32, 32))  # unbatched


# ======================================================================= grad checkpointing


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', SMALL)
def test_grad_checkpointing_same_outputs_and_grads(name, train, make_edlnet, monkeypatch):
    ref = make_edlnet(name, train=train)
    ckpt = copy.deepcopy(ref)  # before any forward: both estimate L identically
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and not ref.grad_checkpointing

    calls = []
    orig = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', counting_checkpoint)
    x = _input(ref)
    target = torch.tensor([1, 3])
    out_ref = ref(x)
    assert not calls
    out_ckpt = ckpt(x)
    num_blocks = sum(len(getattr(ref, n)) for n in ref.stage_names)
    assert len(calls) == num_blocks  # checkpointing is really active, block by block
    torch.testing.assert_close(out_ckpt, out_ref, rtol=1e-5, atol=1e-6)
    F.cross_entropy(out_ref, target).backward()
    F.cross_entropy(out_ckpt, target).backward()
    grads_ckpt = dict(ckpt.named_parameters())
    for n, p in ref.named_parameters():
        assert grads_ckpt[n].grad is not None, n
        torch.testing.assert_close(grads_ckpt[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


# ======================================================================= group_matcher


@pytest.mark.parametrize('coarse', [True, False], ids=['coarse', 'fine'])
@pytest.mark.parametrize('name', ['edlnet_resnet18', 'edlnet_preact_resnet18', 'edlnet_resnet50'])
def test_group_matcher(name, coarse, make_edlnet):
    model = make_edlnet(name)
    matcher = model.group_matcher(coarse=coarse)
    groups = group_parameters(model, matcher)
    all_params = [n for n, _ in model.named_parameters()]
    grouped = [n for names in groups.values() for n in names]
    assert len(grouped) == len(set(grouped)), 'a parameter is in two groups'
    assert sorted(grouped) == sorted(all_params)
    ids = list(groups)
    assert ids == sorted(ids)
    stem = groups[ids[0]]
    assert 'conv1.weight' in stem and all(n.split('.')[0] in ('conv1', 'bn1') for n in stem)
    group_of = {n: gid for gid, names in groups.items() for n in names}
    # stages in order; the head last; the final norm after every block
    stage_ids = [[group_of[n] for n in all_params if n.startswith(s + '.')] for s in model.stage_names]
    for a, b in zip(stage_ids, stage_ids[1:]):
        assert max(a) < min(b)
    assert min(stage_ids[0]) > ids[0]
    assert group_of['fc.weight'] == ids[-1] > max(stage_ids[-1])
    for n in all_params:
        if n.startswith('final_norm.'):
            assert group_of[n] >= max(stage_ids[-1])
    num_blocks = sum(len(getattr(model, s)) for s in model.stage_names)
    assert len(groups) == 2 + (len(model.stage_names) if coarse else num_blocks)

    mgroups = group_modules(model, matcher)
    grouped_modules = [n for names in mgroups.values() for n in names]
    with_params = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    assert len(grouped_modules) == len(set(grouped_modules))
    assert sorted(grouped_modules) == sorted(with_params)
    assert 'conv1' in mgroups[min(mgroups)]


# ======================================================================= feature extraction


def _features_cases():
    cases = []
    for name in SMALL:
        for out_indices in (None, (0, 3), (2, 4)):
            cases.append(pytest.param(name, out_indices, id=f"{name}-{'default' if out_indices is None else '_'.join(map(str, out_indices))}"))
    return cases


@pytest.mark.parametrize('name,out_indices', _features_cases())
def test_features_only(name, out_indices, make_edlnet):
    kwargs = {} if out_indices is None else dict(out_indices=out_indices)
    torch.manual_seed(0)
    feat_model = make_edlnet(name, features_only=True, **kwargs)
    model = make_edlnet(name)
    res = feat_model.load_state_dict(model.state_dict(), strict=False)
    assert not res.missing_keys
    indices = list(out_indices) if out_indices is not None else list(range(len(model.feature_info)))
    info = feat_model.feature_info
    assert info.channels() == [model.feature_info[i]['num_chs'] for i in indices]
    assert info.reduction() == [model.feature_info[i]['reduction'] for i in indices]
    x = _input(model)
    h, w = x.shape[-2:]
    with torch.no_grad():
        feats = feat_model(x)
        _, inter = model.forward_intermediates(x, indices=indices)
    assert len(feats) == len(indices) == len(inter)
    for f, c, r, ref in zip(feats, info.channels(), info.reduction(), inter):
        assert f.shape == (2, c, h // r, w // r)
        torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', SMALL)
def test_forward_intermediates(name, make_edlnet):
    model = make_edlnet(name)
    x = _input(model)
    h = x.shape[-1]
    taps = len(model.feature_info)
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats, rtol=0, atol=0)
        assert len(inter) == taps
        for t, info in zip(inter, model.feature_info):
            assert t.shape == (2, info['num_chs'], h // info['reduction'], h // info['reduction'])

        # int n: the last n taps; list: those taps
        _, last2 = model.forward_intermediates(x, indices=2)
        assert len(last2) == 2
        for a, b in zip(last2, inter[-2:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        _, some = model.forward_intermediates(x, indices=[0, 2])
        for a, b in zip(some, [inter[0], inter[2]]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

        # norm: the final norm/act is applied to the last tap, which then equals forward_features
        _, normed = model.forward_intermediates(x, norm=True)
        torch.testing.assert_close(normed[-1], feats, rtol=0, atol=0)
        if 'preact' in name:  # raw last stage output != normalised features
            assert not torch.allclose(inter[-1], feats)
        for a, b in zip(normed[:-1], inter[:-1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

        # stop_early: stop at the last requested stage; returned x is that stage's output
        x_early, early = model.forward_intermediates(x, indices=[1, 2], stop_early=True)
        assert len(early) == 2
        torch.testing.assert_close(early[0], inter[1], rtol=0, atol=0)
        torch.testing.assert_close(early[1], inter[2], rtol=0, atol=0)
        torch.testing.assert_close(x_early, inter[2], rtol=0, atol=0)

        only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        assert isinstance(only, list) and len(only) == 2
        torch.testing.assert_close(only[1], inter[3], rtol=0, atol=0)

        with pytest.raises(ValueError):
            model.forward_intermediates(x, output_fmt='NHWC')


@pytest.mark.parametrize('name', SMALL)
def test_prune_intermediate_layers(name, make_edlnet):
    model = make_edlnet(name)
    pruned = copy.deepcopy(model)
    x = _input(model)
    with torch.no_grad():
        _, ref = model.forward_intermediates(x, indices=[1, 2])
    kept = pruned.prune_intermediate_layers([1, 2])
    assert list(kept) == [1, 2]
    assert _count(pruned) < _count(model)
    assert not any(n.startswith(('layer3.', 'layer4.', 'fc.')) for n, _ in pruned.named_parameters())
    assert pruned.num_features == model.feature_info[2]['num_chs']
    with torch.no_grad():
        _, got = pruned.forward_intermediates(x, indices=[1, 2])
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        out = pruned(x)  # head was reset to (0, ''): the unpooled stage-2 map
    torch.testing.assert_close(out, ref[1], rtol=0, atol=0)


# ======================================================================= TorchScript / FX


@pytest.mark.parametrize('name', ['edlnet_resnet18', 'edlnet_preact_resnet18'])
def test_torchscript(name, make_edlnet):
    with set_layer_config(scriptable=True):
        # a converged L estimate: the scripted layers refresh it by a few warm iterations per call
        model = make_edlnet(name, scriptable=True, edl_cfg=dict(power_iters=30))
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(x)
        out2 = scripted(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out2, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('name', SMALL)
def test_fx_feature_extraction(name, make_edlnet):
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names
    model = make_edlnet(name)
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
        _, inter = model.forward_intermediates(x)
    train_nodes, eval_nodes = get_graph_node_names(model)
    # EDLConv2d is a leaf: the layer is one node, its solver is not traced
    for n, _ in edl_layers(model):
        assert n in eval_nodes
        assert not any(node.startswith(n + '.') for node in eval_nodes), n
    taps = [_stem_tap(name)] + model.stage_names
    extractor = create_feature_extractor(model, return_nodes={eval_nodes[-1]: 'out', **{t: t for t in taps}})
    with torch.no_grad():
        got = extractor(x)
    torch.testing.assert_close(got['out'], ref, rtol=0, atol=0)
    for t, r in zip(taps, inter):
        torch.testing.assert_close(got[t], r, rtol=0, atol=0)
    # timm's own FX feature wrapper
    graph_net = make_edlnet(name, features_only=True, feature_cls='fx')
    res = graph_net.graph_module.load_state_dict(model.state_dict(), strict=False)
    assert not res.missing_keys
    assert graph_net.feature_info.channels() == [f['num_chs'] for f in model.feature_info]
    with torch.no_grad():
        for f, r in zip(graph_net(x), inter):
            torch.testing.assert_close(f, r, rtol=0, atol=0)
    # train-mode graph backpropagates to every parameter
    model.train()
    train_extractor = create_feature_extractor(model, return_nodes={train_nodes[-1]: 'out'})
    F.cross_entropy(train_extractor(x)['out'], torch.tensor([1, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())


# ======================================================================= gradients / beta


@pytest.mark.parametrize('name', SMALL)
def test_every_parameter_gets_a_gradient(name, make_edlnet):
    model = make_edlnet(name, train=True)
    out = model(_input(model))
    F.cross_entropy(out, torch.tensor([1, 3])).backward()
    params = dict(model.named_parameters())
    betas = [n for n in params if n.endswith('.beta')]
    assert len(betas) == len(edl_layers(model)) > 0  # beta is learnable by default
    no_grad = [n for n, p in params.items() if p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    zero = [n for n, p in params.items() if not p.grad.abs().sum() > 0]
    assert not zero, zero


def test_vanilla_beta_mode_freezes_beta(make_edlnet):
    model = make_edlnet(train=True)
    set_beta_mode(model, 'vanilla')
    betas = {n: p for n, p in model.named_parameters() if n.endswith('.beta')}
    assert betas and all(not p.requires_grad for p in betas.values())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = model.conv1.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(_input(model)), torch.tensor([1, 3])).backward()
        assert all(p.grad is None for p in betas.values())
        assert all(p.grad is not None for n, p in model.named_parameters() if n not in betas)
        opt.step()
    assert all(float(p) == 1.0 for p in betas.values())
    assert not torch.equal(model.conv1.weight, before)
    set_beta_mode(model, 'elastic')
    assert all(p.requires_grad for p in betas.values())


# ======================================================================= pretrained weights


@pytest.mark.parametrize('name', ['edlnet_resnet18', 'edlnet_resnet18.cifar100', 'edlnet_resnet50_in.in1k',
                                  'edlnet_wrn28_10.cifar10'])
def test_pretrained_without_weights_raises(name):
    expected = tags_with_weights()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # not timm's "no pretrained weights" warning + random init
        with pytest.raises(PretrainedWeightsUnavailable) as err:
            timm.create_model(name, pretrained=True)
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError)
    full = name if '.' in name else f'{name}.{get_pretrained_cfg(name).tag}'
    assert full in msg
    if expected:
        assert all(t in msg for t in expected)
    else:
        assert 'none yet' in msg


def test_pretrained_from_file_overlay(tmp_path, make_edlnet):
    from safetensors.torch import save_file
    model = make_edlnet()
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / 'edlnet_resnet18.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = timm.create_model('edlnet_resnet18', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded.eval()
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out, ref)


def test_pretrained_file_with_in_chans_adaptation_refreshes_stem_step(tmp_path, make_edlnet):
    """timm adapts <first_conv>.weight to in_chans when loading; the stem's L must follow."""
    from safetensors.torch import save_file
    model = make_edlnet(edl_cfg=dict(power_iters=30))
    with torch.no_grad():
        model(_input(model))  # L estimated for the 3-channel stem
    path = tmp_path / 'm.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    gray = timm.create_model('edlnet_resnet18', pretrained=True, in_chans=1,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert gray.conv1.weight.shape[1] == 1
    with torch.no_grad():
        gray(_input(gray))
    stem = gray.conv1
    true_L, _ = operator_norm_sq(stem.dictionary(), [32, 32], stem.stride, stem.padding, num_iters=100)
    torch.testing.assert_close(stem.lipschitz, true_L.float(), rtol=0.05, atol=0)


# ======================================================================= input normalisation, data config


@pytest.mark.parametrize('name', ['edlnet_resnet18', 'edlnet_resnet18_in'])
def test_model_normalises_its_input(name, make_edlnet):
    model = make_edlnet(name)
    norm = model.input_norm
    assert isinstance(norm, edlnet_module.InputNormalize)
    torch.testing.assert_close(norm.mean.flatten(), torch.tensor(CIFAR10_MEAN))
    torch.testing.assert_close(norm.std.flatten(), torch.tensor(CIFAR10_STD))
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
        normalised = (x - norm.mean) / norm.std
        torch.testing.assert_close(norm(x), normalised, rtol=0, atol=0)
        model.input_norm = nn.Identity()
        torch.testing.assert_close(model(normalised), ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(x), ref, atol=1e-3)  # the normalisation matters
    custom = make_edlnet(name, input_mean=(0.5, 0.5, 0.5), input_std=(0.25, 0.25, 0.25))
    torch.testing.assert_close(custom.input_norm.mean.flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(custom.input_norm.std.flatten(), torch.full((3,), 0.25))


@pytest.mark.parametrize('name', ['edlnet_resnet18', 'edlnet_resnet18_in'])
def test_data_config_and_eval_transform_feed_raw_pixels(name, make_edlnet):
    model = make_edlnet(name)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(cfg['mean']) == (0.0, 0.0, 0.0) and tuple(cfg['std']) == (1.0, 1.0, 1.0)
    assert cfg['input_size'] == model.pretrained_cfg['input_size']
    transform = timm.data.create_transform(**cfg)
    size = cfg['input_size'][-1]
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[0, 0] = 0
    pixels[0, 1] = 255
    t = transform(Image.fromarray(pixels))
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    assert t.shape == (3, size, size)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)
    # another size: resized / cropped, still [0, 1] pixels
    big = transform(Image.fromarray(rng.randint(0, 256, (size + 9, size + 17, 3), dtype=np.uint8)))
    assert big.shape == (3, size, size)
    assert float(big.min()) >= 0.0 and float(big.max()) <= 1.0 and float(big.max()) > 0.5


# ======================================================================= edl_layers policy, edl_cfg


@pytest.mark.parametrize('name', ['edlnet_resnet18', 'edlnet_preact_resnet18', 'edlnet_resnet50'])
def test_default_policy_edl_for_every_kxk_conv(name, make_edlnet):
    model = make_edlnet(name)
    convs = _convs(model)
    assert isinstance(convs['conv1'], EDLConv2d)
    assert model.edl_layers == 'default'
    shortcuts = 0
    for n, m in convs.items():
        if isinstance(m, EDLConv2d):
            assert max(m.kernel_size) > 1, n
        else:
            assert type(m) is nn.Conv2d and tuple(m.kernel_size) == (1, 1), n
            shortcuts += 'downsample' in n
    # one projection shortcut per strided stage, plus layer1's in the bottleneck net (64 -> 256)
    assert shortcuts == (4 if name == 'edlnet_resnet50' else 3)
    assert len(edl_layers(model)) == ARCHS[name][2]


@pytest.mark.parametrize('name', ['edlnet_resnet18', 'edlnet_preact_resnet18'])
def test_none_policy_is_the_conv_twin(name, make_edlnet):
    model = make_edlnet(name)
    twin = make_edlnet(name, edl_layers='none')
    assert edl_layers(twin) == []
    assert all(type(m) is nn.Conv2d for m in _convs(twin).values())
    twin_shapes = {n: p.shape for n, p in twin.named_parameters()}
    edl_shapes = {n: p.shape for n, p in model.named_parameters() if not n.endswith('.beta')}
    assert twin_shapes == edl_shapes
    assert set(_convs(twin)) == set(_convs(model))
    with torch.no_grad():
        assert twin(_input(twin)).shape == (2, 10)


@pytest.mark.parametrize('policy,expected', [
    ('all', lambda convs: set(convs)),
    ('stem', lambda convs: {'conv1'}),
    ('blocks', lambda convs: {n for n, m in convs.items() if max(m.kernel_size) > 1} - {'conv1'}),
    ('re:layer1', lambda convs: {'layer1.0.conv1', 'layer1.0.conv2', 'layer1.1.conv1', 'layer1.1.conv2'}),
    ('re:downsample', lambda convs: {'layer2.0.downsample.0', 'layer3.0.downsample.0', 'layer4.0.downsample.0'}),
])
def test_edl_layers_policies(policy, expected, make_edlnet):
    twin_convs = _convs(make_edlnet(edl_layers='none'))
    model = make_edlnet(edl_layers=policy)
    assert {n for n, _ in edl_layers(model)} == expected(twin_convs)
    for n, m in _convs(model).items():  # geometry kept
        ref = twin_convs[n]
        chans = (m.in_chans, m.out_chans) if isinstance(m, EDLConv2d) else (m.in_channels, m.out_channels)
        assert chans == (ref.in_channels, ref.out_channels), n
        assert tuple(m.kernel_size) == tuple(ref.kernel_size)
        assert tuple(m.stride) == tuple(ref.stride) and tuple(m.padding) == tuple(ref.padding)
    if policy == 'all':
        with torch.no_grad():
            assert model(_input(model)).shape == (2, 10)


def test_callable_and_unknown_policies(make_edlnet):
    model = make_edlnet(edl_layers=lambda n, conv: n.startswith('layer4'))
    assert model.edl_layers == 'custom'
    assert {n for n, _ in edl_layers(model)} == {
        'layer4.0.conv1', 'layer4.0.conv2', 'layer4.0.downsample.0', 'layer4.1.conv1', 'layer4.1.conv2'}
    with pytest.raises(ValueError, match='unknown edl policy'):
        make_edlnet(edl_layers='most')


def test_edl_cfg_reaches_every_layer(make_edlnet):
    torch.manual_seed(0)
    base = make_edlnet()
    torch.manual_seed(0)
    model = make_edlnet(edl_cfg=dict(num_steps=3, lam=0.05, step_rule='safe', beta=0.5, bias=True))
    layers = edl_layers(model)
    assert len(layers) == ARCHS['edlnet_resnet18'][2]
    for n, m in layers:
        assert m.num_steps == 3 and m.step_rule == 'safe' and m.power_iters == 5, n
        assert float(m.lam) == pytest.approx(0.05) and float(m.beta.detach()) == 0.5, n
        assert m.bias is not None, n
    assert model.edl_cfg['num_steps'] == 3
    # the option is used: num_steps alone changes the output of otherwise identical nets
    steps3 = make_edlnet(edl_cfg=dict(num_steps=3))
    steps3.load_state_dict(base.state_dict())
    x = _input(base)
    with torch.no_grad():
        assert not torch.allclose(steps3(x), base(x), atol=1e-5)
    frozen = make_edlnet(edl_cfg=dict(beta_learnable=False))
    assert not any(n.endswith('.beta') for n, _ in frozen.named_parameters())
    with pytest.raises(ValueError, match='unknown EDL option'):
        make_edlnet(edl_cfg=dict(num_stepz=3))


# ======================================================================= determinism, state dict


@pytest.mark.parametrize('name', SMALL)
def test_determinism(name, make_edlnet):
    torch.manual_seed(0)
    a = make_edlnet(name)
    torch.manual_seed(0)
    b = make_edlnet(name)
    torch.manual_seed(1)
    c = make_edlnet(name)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa['conv1.weight'], c.state_dict()['conv1.weight'])
    x = _input(a)
    with torch.no_grad():
        out1 = a(x)
        out2 = a(x)
        out_b = b(x)
    assert torch.equal(out1, out2)
    assert torch.equal(out1, out_b)


@pytest.mark.parametrize('name', SMALL)
def test_state_dict_round_trip(name, make_edlnet):
    torch.manual_seed(0)
    model = make_edlnet(name)
    x = _input(model)
    with torch.no_grad():
        ref = model(x)
    sd = model.state_dict()
    for n, _ in edl_layers(model):
        assert float(sd[n + '.lipschitz']) > 0
        assert sd[n + '.lipschitz_size'].tolist() == list(model.get_submodule(n).lipschitz_size.tolist())
    # a fresh model with another init and another power-iteration budget: a recomputed L would differ
    torch.manual_seed(1)
    fresh = timm.create_model(name).eval()
    assert not torch.equal(fresh.state_dict()['conv1.weight'], sd['conv1.weight'])
    fresh.load_state_dict(sd)
    with torch.no_grad():
        out = fresh(x)
    assert torch.equal(out, ref)
    for n, m in edl_layers(fresh):
        assert torch.equal(m.lipschitz, sd[n + '.lipschitz'])


# ---------------------------------------------------------------- the elastic regime's gradient

def test_input_gradient_is_sane_at_every_beta():
    """edlnet_resnet18 at initialisation, float64, eval mode, reference solver: for every beta
    the input gradient of the cross-entropy is finite, within 100x of the beta = 1 network's
    norm, and agrees with central finite differences (h = 1e-5, median relative error under
    5 % over 8 random directions): the table of ``experiments/gradient_sanity.py``.  The
    original layer (init='zero', reweight='floor') fails this from beta = 0.8 down: norms of
    1e10 to 1e28 and 100 % disagreement (``--legacy``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'experiments'))
    import gradient_sanity
    rows = list(gradient_sanity.rows(legacy=False, betas=(1.0, 0.8, 0.5, 0.3, 0.0), n_dirs=8, h=1e-5))
    assert [r[0] for r in rows] == [1.0, 0.8, 0.5, 0.3, 0.0]
    for beta, norm, ratio, median_error, _, finite in rows:
        assert finite, beta
        assert 0.01 <= ratio <= 100, (beta, norm, ratio)
        assert median_error < 0.05, (beta, median_error)


@pytest.mark.parametrize('name', ALL_ARCHS)
def test_features_only_without_arguments_gives_every_level(name):
    """timm's default out_indices asked for 5 levels; the 3-stage WideResNets have 4
    (create_model('edlnet_wrn28_10', features_only=True) raised IndexError)."""
    channels, reductions = ARCHS[name][4], ARCHS[name][5]
    model = timm.create_model(name, features_only=True, edl_layers='none').eval()
    assert model.feature_info.channels() == list(channels)
    assert model.feature_info.reduction() == list(reductions)
    size = 64 if name.endswith('_in') else 32
    with torch.no_grad():
        feats = model(torch.rand(1, 3, size, size))
    assert [f.shape[1] for f in feats] == list(channels)
    assert [size // f.shape[-1] for f in feats] == list(reductions)

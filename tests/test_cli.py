"""The ``timm-edl`` dispatcher, the one ``KEY=VALUE`` grammar of every command (YAML values,
checked against PyYAML's own reading of the same text), the one model option group and the
one exit-status rule (2 for a usage error, with a message that names it)."""
import argparse

import pytest
import yaml

from timm_edl.cli import COMMANDS, main
from timm_edl.cli.args import KwargsError, add_model_options, model_options, parse_kwargs


@pytest.mark.parametrize('text', ['[8, 16]', '{beta: 0.5, num_steps: 3}', 'true', '0.1', 'none', '"quoted"', '8/255',
                                  'null', '{"a": [1, 2]}'])
def test_values_read_as_yaml(text):
    assert parse_kwargs([f'key={text}']) == {'key': yaml.safe_load(text)}


def test_a_mapping_entry_gives_several_keys():
    text = '{widths: [8, 16], edl_cfg: {beta: 0.5}}'
    assert parse_kwargs([text, 'edl_layers=none']) == {**yaml.safe_load(text), 'edl_layers': 'none'}


def test_keys_are_stripped_and_empty_values_are_strings():
    assert parse_kwargs([' edl_layers =none', 'name=']) == {'edl_layers': 'none', 'name': ''}


@pytest.mark.parametrize('item, message', [
    ('widths', 'expected key=value'),
    ('=3', 'expected key=value'),
    ('channels=(8,16)', r'channels=\[8,16\]'),
    ('edl_cfg={beta: [', 'not valid YAML'),
    ('{beta: [', 'not a valid YAML mapping'),
    ('{1: 2}', 'expected key=value or a mapping'),
])
def test_bad_entries_say_what_to_write(item, message):
    with pytest.raises(KwargsError, match=message):
        parse_kwargs([item], '--model-kwargs')


def test_every_command_has_a_main_and_help(capsys):
    assert main([]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in COMMANDS)
    assert main(['no-such-command']) == 2
    for name in ('eval', 'export', 'push', 'convert'):
        with pytest.raises(SystemExit) as exit_info:
            main([name, '--help'])
        assert exit_info.value.code == 0
        assert f'timm-edl {name}' in capsys.readouterr().out


@pytest.mark.parametrize('command', [
    ['export', '--model', 'edlnet_resnet18', '--checkpoint', 'w.safetensors', '--out', 'x'],
    ['convert', '--model', 'resnet18', '--out', 'x'],
])
def test_commands_share_the_grammar(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(command + ['--model-kwargs', 'layers=(1,1)']) == 2
    assert 'layers=[1,1]' in capsys.readouterr().err


def _model_group(parser):
    group = next(g for g in parser._action_groups if g.title == 'model')
    return {a.option_strings[0]: a.help for a in group._group_actions}


def _parsers():
    from timm_edl.cli.convert import _parser as convert_parser
    from timm_edl.cli.eval import build_parser as eval_parser
    from timm_edl.cli.export import _parser as export_parser
    from timm_edl.cli.train import _parser as train_parser
    return {'eval': eval_parser(), 'export': export_parser(), 'convert': convert_parser(), 'train': train_parser()}


def test_every_command_with_a_model_has_the_same_model_options():
    reference = argparse.ArgumentParser()
    add_model_options(reference)
    expected = _model_group(reference)
    assert set(expected) == {'--model', '--arch', '--model-kwargs', '--checkpoint', '--allow-pickle'}
    for name, parser in _parsers().items():
        group = _model_group(parser)
        if name == 'train':  # --arch is parsed (to be refused), not offered
            assert group.pop('--arch') == argparse.SUPPRESS
            expected_here = {k: v for k, v in expected.items() if k != '--arch'}
        else:
            expected_here = expected
        assert group == expected_here, name


def test_model_options_are_resolve_model_arguments():
    import inspect

    from timm_edl.hub import resolve_model
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    args = parser.parse_args(['--model', 'w.safetensors', '--arch', 'edlnet_resnet18', '--model-kwargs',
                              'widths=[8,16]', '{edl_layers: none}', '--checkpoint', 'c.pth', '--allow-pickle'])
    options = model_options(args)
    assert options == {'spec': 'w.safetensors', 'arch': 'edlnet_resnet18', 'checkpoint': 'c.pth',
                       'allow_pickle': True, 'model_kwargs': {'widths': [8, 16], 'edl_layers': 'none'}}
    assert set(options) <= set(inspect.signature(resolve_model).parameters)
    assert model_options(parser.parse_args(['--model', 'resnet18'])) == {'spec': 'resnet18'}  # only what was given


def test_train_model_options_set_the_recipe_keys(tmp_path, capsys):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('model: resnet18\nmodel_kwargs: {widths: [8, 16], layers: [1, 1]}\n'
                      'dataset: fashion-mnist-small\n')
    assert main(['train', '--config', str(recipe), '--print-config']) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg['model'] == 'resnet18' and cfg['model_kwargs'] == {'widths': [8, 16], 'layers': [1, 1]}
    assert cfg['checkpoint'] is None and cfg['allow_pickle'] is False
    # the group replaces model_kwargs; a dotted override, before or after it, adds one key
    assert main(['train', '--config', str(recipe), '--model-kwargs.edl_layers', 'none', '--model', 'edlnet_resnet18',
                 '--model-kwargs', 'widths=[4,8]', '--checkpoint', 'w.pth', '--allow-pickle', '--epochs', '2',
                 '--print-config']) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg['model'] == 'edlnet_resnet18' and cfg['model_kwargs'] == {'widths': [4, 8], 'edl_layers': 'none'}
    assert cfg['checkpoint'] == 'w.pth' and cfg['allow_pickle'] is True and cfg['epochs'] == 2


@pytest.mark.parametrize('command, message', [
    (['train', '--epochs', 'two'], "epochs: expected an integer, got 'two'"),
    (['train', '--arch', 'edlnet_resnet18'], 'train has no --arch'),
    (['train', '--model', 'edlnet_resnet18', '--checkpoint', 'w.pth', '--dataset', 'fashion-mnist-small',
      '--print-config', '--model-kwargs', 'stem_width'], "--model-kwargs: expected key=value, got 'stem_width'"),
    (['eval', '--model', 'edlnet_resnet81', '--dataset', 'fashion-mnist-small', '--n-ex', '4'],
     "unknown model 'edlnet_resnet81'"),
    (['eval', '--model', 'edlnet_resnet18', '--eps', 'eight'], 'invalid eps'),
    (['export', '--model', 'edlnet_resnet18', '--out', 'x'], '--checkpoint is required'),
    (['export', '--model', 'edlnet_resnet18', '--checkpoint', 'missing.safetensors', '--out', 'x'],
     'missing.safetensors'),
    (['push', 'no_such_folder', '--dry-run'], 'export folder not found'),
    (['convert', '--model', 'no_such_net', '--out', 'x'], "unknown model 'no_such_net'"),
    (['demo', '--out', 'busy'], 'already holds a demo run'),
])
def test_a_bad_input_exits_2_and_says_what_was_wrong(command, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'file').write_text('an earlier run')
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'timm-edl {command[0]}: error: ') and message in err and 'Traceback' not in err
    assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_argparse_errors_exit_2_everywhere(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, '--no-such-flag' if name != 'train' else '--config'])
    assert exit_info.value.code == 2
    assert f'timm-edl {name}' in capsys.readouterr().err

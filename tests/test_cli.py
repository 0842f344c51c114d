"""The ``timm-edl`` dispatcher and the one ``KEY=VALUE`` grammar of every command (YAML values,
checked against PyYAML's own reading of the same text)."""
import pytest
import yaml

from timm_edl.cli import COMMANDS, main
from timm_edl.cli.args import KwargsError, parse_kwargs


@pytest.mark.parametrize('text', ['[8, 16]', '{beta: 0.5, num_steps: 3}', 'true', '0.1', 'none', '"quoted"', '8/255',
                                  'null', '{"a": [1, 2]}'])
def test_values_read_as_yaml(text):
    assert parse_kwargs([f'key={text}']) == {'key': yaml.safe_load(text)}


def test_keys_are_stripped_and_empty_values_are_strings():
    assert parse_kwargs([' edl_layers =none', 'name=']) == {'edl_layers': 'none', 'name': ''}


@pytest.mark.parametrize('item, message', [
    ('widths', 'expected key=value'),
    ('=3', 'expected key=value'),
    ('channels=(8,16)', r'channels=\[8,16\]'),
    ('edl_cfg={beta: [', 'not valid YAML'),
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
    assert main(command + ['--model-kwargs', 'layers=(1,1)']) == 1
    assert 'layers=[1,1]' in capsys.readouterr().err

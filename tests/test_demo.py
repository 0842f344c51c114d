"""A shortened `make demo` (train -> eval -> export -> reload) runs end to end."""
import json

from timm_edl import demo


def test_short_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert demo.main(['--out', str(out), '--epochs', '1', '--train-n-ex', '600', '--n-ex', '16']) == 0
    printed = capsys.readouterr().out
    assert '| accuracy | EDLNet | conv twin |' in printed
    assert 'reproduces the logits exactly' in printed
    export = out / 'export' / 'edlnet'
    assert {p.name for p in export.iterdir()} == {'model.safetensors', 'config.json', 'README.md'}
    card = (export / 'README.md').read_text()
    assert 'model-index' in card and 'adversarial-robustness' in card
    reports = list((out / 'eval' / 'edlnet').glob('*.json'))
    assert len(reports) == 1 and json.loads(reports[0].read_text())['n_ex'] == 16
    # a second run refuses to overwrite the first without --overwrite (a usage error: exit status 2)
    stamp = (export / 'model.safetensors').stat().st_mtime_ns
    assert demo.main(['--out', str(out), '--epochs', '1', '--train-n-ex', '600', '--n-ex', '16']) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert (export / 'model.safetensors').stat().st_mtime_ns == stamp

"""``experiments/zoo_pairs.py`` + ``zoo_ship.py`` at toy size on the bundled Fashion-MNIST-small:
an EDLNet and its registered conv twin trained (Gaussian-noise training), evaluated (clean,
certified) and shipped from their folders; a rerun does nothing more; the shipped weights are
kept once (the package copy) and shipping again from it writes the same cards."""
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import safetensors.torch

from timm_edl.weights import file_sha256

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments'))

import zoo_pairs  # noqa: E402
import zoo_ship  # noqa: E402

RECIPE = """
model: edlnet_resnet8_in
model_kwargs: {input_mean: [0.5], input_std: [0.5], edl_cfg: {beta: 1.0, beta_learnable: false}}
dataset: fashion-mnist-small
train_n_ex: 192
batch_size: 64
num_workers: 0
augment: false
objective: natural
sigma: 0.25
epochs: 2
opt: sgd
lr: 0.05
sched: cosine
val_every: 1
val_split: holdout
val_n_ex: 64
val_select: noisy
val_attack_steps: 1
val_batch_size: 64
seed: 0
save_every_steps: 2
"""


def _pair(recipe: Path) -> zoo_pairs.Pair:
    data = ('--dataset', 'fashion-mnist-small')
    return zoo_pairs.Pair(
        'toy-smoothing', 'fashion-mnist-small', 'Fashion-MNIST-small', 'toy_smooth',
        {'edl': 'edlnet_resnet8_in', 'conv': 'edlnet_resnet8_in_conv'}, str(recipe),
        (zoo_pairs.Step('full', 'eval', data + ('--attacks', 'clean', '--no-checks', '--n-ex', '32',
                                                '--batch-size', '32', '--threat-model', 'Linf', '--eps', '0.1')),
         zoo_pairs.Step('certify', 'certify', data + ('--sigma', '0.25', '--n0', '16', '--n', '64', '--n-ex', '4',
                                                      '--chunk-size', '2', '--batch-size', '64'))),
        'toy Gaussian-noise training')


def test_toy_pair_trains_evaluates_resumes_and_ships(tmp_path, monkeypatch):
    recipe = tmp_path / 'toy.yaml'
    recipe.write_text(RECIPE)
    pair = _pair(recipe)
    args = zoo_pairs.build_parser().parse_args([
        '--cache-root', str(tmp_path / 'cache'), '--run-dir', str(tmp_path / 'runs'), '--zoo-dir', str(tmp_path / 'pkg'),
        '--card-dir', str(tmp_path / 'cards'), '--out-md', str(tmp_path / 'docs' / 'zoo.md'),
        '--readme', str(tmp_path / 'README.md')])
    messages = []
    for arm in zoo_pairs.ARMS:
        assert zoo_pairs.work_arm(pair, arm, args, None, messages.append), messages
    state = zoo_pairs.status(pair, args.cache_root)
    assert all(all(v.values()) for v in state.values()), state
    twin = json.loads((zoo_pairs.train_dir(pair, 'conv', args.cache_root) / 'best' / 'config.json').read_text())
    assert twin['architecture'] == 'edlnet_resnet8_in_conv'

    # a rerun finds every step done and runs nothing
    logs = zoo_pairs.cache_dir(pair, args.cache_root) / 'logs'
    before = {p.name: p.read_text() for p in logs.iterdir()}
    assert zoo_pairs.work_arm(pair, 'edl', args, None, messages.append)
    assert {p.name: p.read_text() for p in logs.iterdir()} == before

    # a step that cannot resume part-way is not started with less time left than it needs
    longer = dataclasses.replace(pair, steps=pair.steps + (zoo_pairs.Step('long', 'eval', (), min_minutes=30),))
    assert not zoo_pairs.work_arm(longer, 'edl', args, time.time() + 600, messages.append)
    assert 'long left for the next run (it needs 30 min)' in messages[-1]
    assert {p.name: p.read_text() for p in logs.iterdir()} == before

    # a second pair (a copy of the first's folder under another tag), shipped on its own later
    other = dataclasses.replace(pair, key='toy-smoothing-copy', tag='toy_copy')
    shutil.copytree(zoo_pairs.cache_dir(pair, args.cache_root), zoo_pairs.cache_dir(other, args.cache_root))
    monkeypatch.setitem(zoo_ship.PAIRS, pair.key, pair)

    best = zoo_pairs.train_dir(pair, 'edl', args.cache_root) / 'best' / 'model.safetensors'
    trained = safetensors.torch.load_file(str(best))
    assert zoo_ship.ship_pairs([pair], args, messages.append) == ['edlnet_resnet8_in.toy_smooth',
                                                                  'edlnet_resnet8_in_conv.toy_smooth']
    manifest = json.loads((tmp_path / 'pkg' / 'manifest.json').read_text())
    for name, entry in manifest.items():
        assert entry['sha256'] == file_sha256(tmp_path / 'pkg' / entry['file'])
    shipped = safetensors.torch.load_file(str(tmp_path / 'pkg' / 'edlnet_resnet8_in.toy_smooth.safetensors'))
    assert all((trained[k] == shipped[k]).all() for k in trained)
    assert not best.exists()  # stored once: the package copy

    card = (tmp_path / 'cards' / 'edlnet_resnet8_in.toy_smooth.md').read_text()
    assert 'Certified robustness (randomized smoothing)' in card
    assert (tmp_path / 'cards' / 'edlnet_resnet8_in.toy_smooth.certified_accuracy.png').is_file()
    assert 'conv twin (edlnet_resnet8_in_conv, same recipe and seed)' in card
    assert '## Paired comparison with its twin' in card and 'Certified, L2 radius 0.25 (4 points)' in card
    section = (tmp_path / 'docs' / 'results.md').read_text()
    assert 'Certified, L2 radius 0.25 (4 points)' in section and 'McNemar' in section

    # shipping again reads the package copy (checked by its sha256) and writes the same card
    assert zoo_ship.ship_pairs([pair], args, messages.append)
    assert (tmp_path / 'cards' / 'edlnet_resnet8_in.toy_smooth.md').read_text() == card

    # shipping the second pair alone keeps the first one's README rows and docs section
    assert zoo_ship.ship_pairs([other], args, messages.append) == ['edlnet_resnet8_in.toy_copy',
                                                                   'edlnet_resnet8_in_conv.toy_copy']
    readme = (tmp_path / 'README.md').read_text()
    for tag in ('toy_smooth', 'toy_copy'):
        assert sum(f'| `{tag}` |' in line for line in readme.splitlines()) == 2, readme
    docs = (tmp_path / 'docs' / 'zoo.md').read_text()
    assert docs.count('### Fashion-MNIST-small: `edlnet_resnet8_in` vs `edlnet_resnet8_in_conv`') == 2


def test_a_step_past_the_deadline_stops_at_a_chunk_even_when_the_driver_ignores_sigint(tmp_path):
    """The driver, started in the background by a shell, inherits SIGINT ignored; its steps still
    stop on the deadline's SIGINT (exit 130, Ctrl-C's) with their finished chunks saved."""
    import signal
    import time
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        out = tmp_path / 'cert'
        argv = ['certify', '--model', 'edlnet_resnet18', '--model-kwargs', 'widths=[8,16]', 'layers=[1,1]',
                'stem_width=8', 'stem_type=imagenet',
                '--dataset', 'fashion-mnist-small', '--sigma', '0.25', '--n0', '8', '--n', '20000', '--n-ex', '200',
                '--chunk-size', '1', '--batch-size', '500', '--device', 'cpu', '--no-progress', '--out', str(out)]
        started = time.time()
        rc = zoo_pairs._run(argv, tmp_path / 'log.txt', deadline=time.time() + 15)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 130, (tmp_path / 'log.txt').read_text()[-2000:]
    assert zoo_pairs.thread_counts(tmp_path / 'log.txt') == [1]  # the command line it logged, read back
    assert time.time() - started < 120
    assert list((out / '.certify-state').glob('certify-*.json'))  # the finished chunks are kept


def test_cores_are_shared_by_the_arms_at_work():
    lanes = zoo_pairs.Lanes(cores=2, jobs=2, arms=2)
    assert lanes.threads() == 1
    lanes.finish()
    assert lanes.threads() == 2
    assert zoo_pairs.Lanes(cores=2, jobs=1, arms=2).threads() == 2  # one arm at a time gets every core
    assert zoo_pairs.Lanes(cores=4, jobs=2, arms=4).threads() == 2
    assert zoo_pairs.Lanes(cores=1, jobs=2, arms=2).threads() == 1


def test_a_training_restarted_for_freed_cores_stops_at_a_step_and_resumes(tmp_path, monkeypatch):
    """The driver stops a training run when cores are freed (SIGINT once its first state is
    saved): it stops at an optimizer step with its state saved (exit 130), and the rerun on
    more threads continues from there to the end."""
    monkeypatch.setattr(zoo_pairs, 'POLL_S', 0.2)
    recipe = tmp_path / 'toy.yaml'
    recipe.write_text(RECIPE.replace('epochs: 2', 'epochs: 8').replace('val_every: 1', 'val_every: 8')
                      .replace('save_every_steps: 2', 'save_every_steps: 1'))
    out = tmp_path / 'run'
    argv = ['train', '--config', str(recipe), '--output', str(out), '--progress', 'never']
    saved = lambda: (out / 'checkpoints').is_dir() and any((out / 'checkpoints').iterdir())  # noqa: E731
    rc = zoo_pairs._run(argv, tmp_path / 'log.txt', None, threads=1, restart=saved)
    log = (tmp_path / 'log.txt').read_text()
    assert rc == 130, log[-2000:]
    assert 'stopped on Ctrl-C after' in (out / 'log.txt').read_text()
    stopped = json.loads(max((out / 'checkpoints').iterdir()).joinpath('progress.json').read_text())
    assert stopped['stopped'] == 'interrupted' and 0 < stopped['global_update'] < 8 * 3
    rc = zoo_pairs._run(['train', '--resume', '--output', str(out), '--progress', 'never'], tmp_path / 'log.txt',
                        None, threads=2)
    assert rc == 0 and zoo_pairs.training_done(out)
    assert '1 thread(s)' in log and (tmp_path / 'log.txt').read_text().count('2 thread(s)') == 1
    assert f"resumed from {out / 'checkpoints'}" in (out / 'log.txt').read_text()

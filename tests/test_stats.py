"""Paired statistics (timm_edl.stats) and where they show: McNemar's exact test against scipy's
binomial test, the discordant counts, the per-point packing, and the McNemar p-values of the
model card's comparison table for two hand-made evaluation reports with known discordant counts."""
import random

import pytest
import torch
from scipy.stats import binomtest

from test_hub import tiny_edlnet
from timm_edl import hub
from timm_edl.hub.card import comparison_markdown
from timm_edl.results import read_eval_results
from timm_edl.stats import mcnemar_exact, pack_correct, paired_counts, sign_test, unpack_correct


@pytest.mark.parametrize('b,c', [(0, 0), (0, 5), (2, 8), (7, 7), (30, 51), (400, 460), (1, 0), (12, 100)])
def test_mcnemar_exact_matches_scipy_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact(c, b) == mcnemar_exact(b, c)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError, match='>= 0'):
        mcnemar_exact(-1, 3)


def test_paired_counts_and_packing_round_trip():
    rng = random.Random(0)
    a = [rng.random() < 0.6 for _ in range(1001)]
    b = [rng.random() < 0.5 for _ in range(1001)]
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    assert paired_counts(a, b) == (only_a, only_b)
    assert paired_counts(torch.tensor(a), torch.tensor(b)) == (only_a, only_b)
    assert unpack_correct(pack_correct(torch.tensor(a)), 1001) == a
    assert pack_correct([True] * 8 + [False, True]) == 'ff40'
    with pytest.raises(ValueError, match='same points'):
        paired_counts(a, b[:-1])
    with pytest.raises(ValueError, match='hold 1008 points, asked for 2000'):
        unpack_correct(pack_correct(a), 2000)
    with pytest.raises(ValueError, match='hex string'):
        unpack_correct('xyz', 3)


def _bits(n, correct_at):
    return [i in correct_at for i in range(n)]


def _reports(n=100):
    """This model and a twin on the same 100 points. Clean: both right on 0-59, this model only
    on 60-69 (b = 10), the twin only on 70-71 (c = 2). AutoAttack: both on 0-19, this model only
    on 20-22, the twin only on 23-25 (b = c = 3). PGD: the twin's JSON holds no per-point PGD."""
    ours = {'clean': _bits(n, set(range(70))), 'autoattack': _bits(n, set(range(23))),
            'pgd': _bits(n, set(range(30)))}
    twin = {'clean': _bits(n, set(range(60)) | {70, 71}), 'autoattack': _bits(n, set(range(20)) | {23, 24, 25})}
    common = dict(dataset='cifar10', n_ex=n, threat_model='Linf', eps=8 / 255)

    def report(bits, pgd_acc):
        return dict(common, clean_acc=sum(bits['clean']) / n, autoattack_acc=sum(bits['autoattack']) / n,
                    pgd_acc=pgd_acc, per_point={k: pack_correct(v) for k, v in bits.items()})
    return report(ours, 0.30), report(twin, 0.31)


def test_card_shows_the_mcnemar_p_values_of_the_paired_results(tmp_path):
    ours, twin = _reports()
    p_clean, p_aa = binomtest(10, 12, 0.5).pvalue, 1.0
    results, compare = read_eval_results(ours), {'conv twin': read_eval_results(twin)}
    assert set(results[0]['per_point']) == {'clean', 'autoattack', 'pgd'}  # kept by the schema
    text = comparison_markdown(results, compare)
    assert '| McNemar p (clean / AutoAttack / PGD) |' in text
    assert '| this model | CIFAR-10 (test) | 100 | 70.00 % | 23.00 % | 30.00 % | |' in text
    assert (f'| conv twin | CIFAR-10 (test) | 100 | 62.00 % | 23.00 % | 31.00 % '
            f'| {p_clean:.3g} / {p_aa:.3g} / - |') in text
    assert "'-': the evaluation JSON of conv twin has no per-point PGD results." in text
    folder = hub.export(tiny_edlnet(), tmp_path / 'out', eval_results=ours, compare_results=compare)
    assert f'| {p_clean:.3g} / {p_aa:.3g} / - |' in (folder / 'README.md').read_text()


def test_card_without_per_point_results_says_why():
    ours, twin = _reports()
    del ours['per_point'], twin['autoattack_acc']
    text = comparison_markdown(read_eval_results(ours), {'twin': read_eval_results(twin)})
    assert '| - / - / - |' in text
    assert 'the evaluation JSON of twin has no per-point clean results' not in text  # the twin's are there
    assert 'the evaluation JSON of this model has no per-point clean results' in text
    assert 'AutoAttack was not evaluated for twin' in text
    assert 'the evaluation JSON of this model has no per-point PGD results' in text


def test_bad_per_point_results_are_refused():
    ours, _ = _reports()
    with pytest.raises(ValueError, match=r"per_point\['clean'\]: packed per-point results hold 8 points"):
        read_eval_results(dict(ours, per_point={'clean': 'ff'}))
    with pytest.raises(ValueError, match='hex strings'):
        read_eval_results(dict(ours, per_point={'clean': [True, False]}))


def test_sign_test_against_scipy_binomtest():
    from scipy.stats import binomtest
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 60):
        a = torch.randint(0, 6, (n,), generator=gen).tolist()
        b = torch.randint(0, 6, (n,), generator=gen).tolist()
        more, fewer, p = sign_test(a, b)
        assert more == sum(x > y for x, y in zip(a, b)) and fewer == sum(x < y for x, y in zip(a, b))
        assert p == pytest.approx(binomtest(more, more + fewer, 0.5).pvalue if more + fewer else 1.0, rel=1e-9)
    with pytest.raises(ValueError, match='paired'):
        sign_test([1, 2], [1])

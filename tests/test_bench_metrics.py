"""Quality metrics against independent computations."""

import math

import numpy as np
import pytest
import torch

import bench_fakes as F
from accelerando.bench import metrics as M


def test_exact_match_and_agreement():
    ref = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 0]])
    out = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8], [1, 2, 3, 0]])
    assert M.exact_match_rate(out, ref) == pytest.approx(2 / 3)
    assert M.exact_match_rate(out, ref, prompt_len=3) == 1.0
    assert M.token_agreement(out, ref, prompt_len=2) == pytest.approx(5 / 6)
    # trailing padding (pad 0) is not content: a shorter unpadded row still matches
    assert M.exact_match_rate([[1, 2, 3]], [[1, 2, 3, 0, 0]], pad_token_id=0) == 1.0
    # a missing position counts as a disagreement over the longer length
    assert M.token_agreement([[1, 2]], [[1, 2, 3, 4]]) == 0.5
    assert M.first_divergence(out, ref, prompt_len=1) == [None, 1, None]
    with pytest.raises(ValueError):
        M.exact_match_rate(out[:2], ref)
    assert M.new_token_count([[9, 1, 2, 0, 0], [9, 1, 2, 3, 4]], prompt_len=1, pad_token_id=0) == 6


def test_perplexity_matches_cross_entropy_and_ignores_left_padding():
    model = F.make_llm(seed=1)
    seq = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    prompt_len = 3
    with torch.no_grad():
        logits = model(seq).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[prompt_len - 1:-1], seq[0, prompt_len:])
    assert M.perplexity(model, seq, prompt_len=prompt_len) == pytest.approx(math.exp(nll.item()), rel=1e-5)
    # the same row left-padded by two pad tokens scores the same
    padded = torch.tensor([[0, 0, 10, 11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    got = M.perplexity(model, padded, prompt_len=5, attention_mask=mask)
    assert got == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_rmse():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    assert M.rmse(a, b) == pytest.approx(np.sqrt(np.mean((a - b) ** 2)))
    assert M.rmse(torch.ones(2, 2), torch.ones(2, 2)) == 0.0
    with pytest.raises(ValueError):
        M.rmse(np.zeros(3), np.zeros(4))


def _fd_eig(a, b):
    """Independent: Tr((Ca Cb)^1/2) as the sum of square roots of the eigenvalues of Ca Cb."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev = np.linalg.eigvals(ca @ cb).real.clip(min=0)
    d = a.mean(0) - b.mean(0)
    return d @ d + np.trace(ca) + np.trace(cb) - 2 * np.sqrt(ev).sum()


def test_frechet_distance():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 3))
    b = rng.normal(loc=0.5, scale=2.0, size=(300, 3)) @ np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1.0]])
    assert M.frechet_distance(a, b) == pytest.approx(_fd_eig(a, b), rel=1e-6)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with sample moments
    x, y = rng.normal(size=(100, 1)), rng.normal(3, 2, size=(80, 1))
    s1, s2 = x.std(ddof=1), y.std(ddof=1)
    assert M.frechet_distance(x, y) == pytest.approx((x.mean() - y.mean()) ** 2 + (s1 - s2) ** 2, rel=1e-6)
    # fewer samples than dimensions: singular covariances, still a finite number
    assert np.isfinite(M.frechet_distance(rng.normal(size=(4, 10)), rng.normal(size=(5, 10))))
    with pytest.raises(ValueError):
        M.frechet_distance(a[:1], b)
    with pytest.raises(ValueError):
        M.frechet_distance(a, b[:, :2])

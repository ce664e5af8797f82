"""Learned PCA-whitening (hapkit.training.whitening) against a direct computation, scikit-learn,
and inside an EmbeddingModel."""

import io

import numpy as np
import pytest
import torch

from hapkit.training.config import ModelConfig
from hapkit.training.models import build_model
from hapkit.training.whitening import (
    PCAWhitening,
    attach_whitening,
    ensure_whitening,
    fit_pca_whitening,
    learn_whitening,
)


def features(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])[:d]
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_whiten(train, x, power, dim=None):
    """Eigen-decomposition of the covariance of the normalised training vectors, written out."""
    t = unit(train)
    mean = t.mean(0)
    cov = (t - mean).T @ (t - mean) / (len(t) - 1)
    var, vecs = np.linalg.eigh(cov)
    var, vecs = var[::-1][:dim], vecs[:, ::-1][:, :dim]
    return unit((unit(x) - mean) @ vecs / var**power)


@pytest.mark.parametrize("power", [0.5, 0.25, 0.0])
def test_fit_matches_a_direct_eigendecomposition(power):
    train, test = features(), features(20, seed=1)
    w = fit_pca_whitening(torch.tensor(train, dtype=torch.float32), power=power)
    got = unit(w(torch.tensor(test, dtype=torch.float32)).numpy())
    ref = reference_whiten(train, test, power)
    # eigenvector signs are arbitrary: compare each column up to its sign
    signs = np.sign((got * ref).sum(0))
    np.testing.assert_allclose(got, ref * signs, atol=2e-5)
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=2e-5)
    assert w.out_dim == 6 and float(w.power) == power


def test_full_whitening_decorrelates_and_power_shrinks():
    train = torch.tensor(features(2000), dtype=torch.float32)
    full = fit_pca_whitening(train, power=0.5)
    y = full(train).double()
    torch.testing.assert_close(torch.cov(y.T), torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)
    shrunk = torch.cov(fit_pca_whitening(train, power=0.25)(train).double().T).diagonal()
    assert (shrunk[:-1] >= shrunk[1:]).all() and shrunk[0] > 1.5 * shrunk[-1]  # variances shrunk, still ordered


def test_agrees_with_naver_form_on_sklearn_pca():
    from sklearn.decomposition import PCA

    train, test = features(), features(15, seed=2)
    pca = PCA(n_components=None, svd_solver="full", whiten=True).fit(unit(train))
    ref = unit((unit(test) - pca.mean_) @ pca.components_[:4].T / pca.explained_variance_[:4] ** 0.25)
    got = unit(fit_pca_whitening(torch.tensor(train), power=0.25, dim=4)(torch.tensor(test)).numpy())
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=1e-5)  # same up to component signs


def test_few_samples_keep_only_the_components_they_span():
    w = fit_pca_whitening(torch.tensor(features(4, d=6)), power=0.5)
    assert w.out_dim == 3  # 4 centred points span 3 dimensions
    assert torch.isfinite(w(torch.randn(2, 6))).all()
    with pytest.raises(ValueError, match="3 of non-zero variance"):
        fit_pca_whitening(torch.tensor(features(4, d=6)), dim=5)
    with pytest.raises(ValueError, match="N >= 2"):
        fit_pca_whitening(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="power must be >= 0"):
        fit_pca_whitening(torch.tensor(features()), power=-1)
    a = fit_pca_whitening(torch.tensor(features()))
    b = fit_pca_whitening(torch.tensor(features()))
    assert torch.equal(a.projection, b.projection)  # signs fixed: reproducible


def small_model(**kw):
    return build_model(ModelConfig(backbone="small_cnn", pretrained=False, width=4, embedding_size=8, **kw)).eval()


def test_whitening_in_the_model_comes_before_the_l2_normalisation():
    torch.manual_seed(0)
    model = small_model()
    images = torch.rand(12, 3, 16, 16)
    plain = model(images)
    assert isinstance(model.whitening, torch.nn.Identity) and not any("whitening" in k for k in model.state_dict())
    w = fit_pca_whitening(plain.detach(), power=0.25, dim=5)
    attach_whitening(model, w)
    out = model(images)
    raw = model.head(model.norm(model.features(images)))
    expected = torch.nn.functional.normalize((torch.nn.functional.normalize(raw, dim=1) - w.mean) @ w.projection.T, dim=1)
    torch.testing.assert_close(out, expected)
    assert out.shape == (12, 5) and model.embedding_size == 5
    assert not any(p is w.projection for p in model.parameters())  # fitted, not trained
    # saved with the model, and loaded back into a fresh one
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()))
    assert {"whitening.mean", "whitening.projection"} <= set(state)
    torch.manual_seed(1)
    fresh = small_model()
    ensure_whitening(fresh, state).load_state_dict(state)
    torch.testing.assert_close(fresh.eval()(images), out)
    with pytest.raises(ValueError, match="takes 6-d inputs but the model's head gives 8"):
        attach_whitening(small_model(), PCAWhitening(6))


def test_learn_whitening_fits_the_unwhitened_embeddings():
    torch.manual_seed(0)
    model = small_model()
    images = torch.rand(20, 3, 16, 16)
    loader = [(images[i:i + 8], torch.zeros(len(images[i:i + 8]), 1, dtype=torch.long)) for i in range(0, 20, 8)]
    attach_whitening(model, PCAWhitening(8, 8))  # a previous whitening is replaced, not stacked
    w = learn_whitening(model, loader, power=0.5, progress=False)
    assert model.whitening is w
    model.whitening = torch.nn.Identity()
    direct = fit_pca_whitening(model(images).detach(), power=0.5)
    torch.testing.assert_close(w.projection, direct.projection, atol=1e-4, rtol=1e-3)


def test_whitening_stays_in_float32_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    w = fit_pca_whitening(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = w(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, w(x))


def test_unwhitened_embeddings_leave_the_whitening_in_place():
    from hapkit.training.whitening import unwhitened_embeddings

    torch.manual_seed(0)
    model = small_model()
    images = torch.rand(12, 3, 16, 16)
    loader = [(images[i:i + 6], torch.zeros(6, 1, dtype=torch.long)) for i in range(0, 12, 6)]
    w = learn_whitening(model, loader, power=0.25, progress=False)
    raw, _ = unwhitened_embeddings(model, loader, progress=False)
    assert model.whitening is w and raw.shape == (12, w.in_dim)
    torch.testing.assert_close(fit_pca_whitening(raw, power=0.25).projection, w.projection)


def test_unwhitened_embeddings_at_several_scales_are_the_multiscale_embeddings_without_whitening():
    from hapkit.evaluate import extract_multiscale_embeddings
    from hapkit.training.whitening import remove_whitening, unwhitened_embeddings

    torch.manual_seed(0)
    model = small_model()
    images = torch.rand(12, 3, 32, 32)
    loader = [(images[i:i + 6], torch.zeros(6, 1, dtype=torch.long)) for i in range(0, 12, 6)]
    w = learn_whitening(model, loader, power=0.25, progress=False, scales=(1.0, 0.5))
    raw, _ = unwhitened_embeddings(model, loader, progress=False, scales=(1.0, 0.5))
    assert model.whitening is w
    expected, _ = extract_multiscale_embeddings(remove_whitening(model), loader, scales=(1.0, 0.5), progress=False)
    torch.testing.assert_close(raw, expected)
    single, _ = unwhitened_embeddings(model, loader, progress=False)
    assert not torch.allclose(raw, single)  # the scales were used
    torch.testing.assert_close(fit_pca_whitening(raw, power=0.25).projection, w.projection)

"""RetrievalMetrics, the torchmetrics form of evaluate: batches in, evaluate's summary out, in a
plain loop and in a Lightning module."""

import warnings

import pytest
import torch

from hapkit.evaluate import RetrievalMetrics, evaluate
from test_evaluate import KS, clustered


def batches(emb, labels, size=13):
    for start in range(0, len(emb), size):
        yield emb[start : start + size], labels[start : start + size]


@pytest.mark.filterwarnings("ignore:.*no positive")
def test_batches_fed_one_by_one_equal_evaluate_on_their_concatenation():
    emb, labels = clustered(n=75, seed=2)
    metric = RetrievalMetrics(ks=KS, chunk_size=16)
    for e, lab in batches(emb, labels):
        metric.update(e, lab)
    summary = metric.compute()
    want = evaluate(emb, labels, ks=KS, chunk_size=16, progress=False)
    assert summary == want.summary
    assert metric.results.per_query.equals(want.per_query)
    metric.reset()
    with pytest.raises(ValueError, match="no query"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' own notice of a compute before any update
        metric.compute()


def test_a_separate_gallery_makes_it_the_query_gallery_protocol():
    emb, labels = clustered(n=72, seed=5)
    metric = RetrievalMetrics(metrics=["H-AP", "AP", "R@k", "ASI@"], ks=KS)
    for e, lab in batches(emb[:20], labels[:20], size=7):
        metric.update(e, lab)
    for e, lab in batches(emb[20:], labels[20:], size=11):
        metric.update(e, lab, gallery=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = metric.compute()
        want = evaluate(emb[:20], labels[:20], gallery_embeddings=emb[20:], gallery_labels=labels[20:],
                        metrics=["H-AP", "AP", "R@k", "ASI@"], ks=KS, progress=False)
    assert summary == want.summary and metric.results.settings["protocol"] == "query/gallery"


def test_bad_options_fail_at_construction_and_bad_batches_at_update():
    with pytest.raises(ValueError, match="unknown metric"):
        RetrievalMetrics(metrics=["nDCG"])
    metric = RetrievalMetrics()
    emb, labels = clustered(n=12)
    with pytest.raises(ValueError, match="label rows"):
        metric.update(emb, labels[:-1])


def test_a_lightning_module_logs_the_metric_at_the_end_of_validation(tmp_path):
    lightning = pytest.importorskip("lightning")
    emb, labels = clustered(n=64, dim=8, seed=7)

    class Embedder(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(8, 6)
            self.retrieval = RetrievalMetrics(metrics=["H-AP", "AP", "R@k"], ks=(1, 4))

        def forward(self, x):
            return torch.nn.functional.normalize(self.net(x), dim=1)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.retrieval.update(self(x), y)

        def on_validation_epoch_end(self):
            self.log_dict({f"val/{k}": v for k, v in self.retrieval.compute().items()})
            self.retrieval.reset()

    module = Embedder()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(emb, labels), batch_size=10)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers
        (logged,) = trainer.validate(module, dataloaders=loader)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = evaluate(module(emb), labels, metrics=["H-AP", "AP", "R@k"], ks=(1, 4), progress=False).summary
    assert logged.keys() == {f"val/{k}" for k in want}
    for k, v in want.items():
        assert logged[f"val/{k}"] == pytest.approx(v, abs=1e-6), k  # Lightning logs float32

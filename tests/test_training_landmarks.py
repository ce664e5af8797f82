"""A model on a landmark benchmark: embeddings, multi-scale, α-QE and the revisited protocol."""

import pytest
import torch

from hapkit.data import build_transforms, get_eval_sets
from hapkit.evaluate import alpha_query_expansion, evaluate_revisited, multiscale_embeddings
from hapkit.training.config import ModelConfig
from hapkit.training.landmarks import embed_landmark_set, evaluate_landmark_set
from hapkit.training.models import build_model
from test_data_revisited import write_city, write_distractors


@pytest.fixture()
def benchmark(tmp_path):
    write_city(tmp_path)
    write_distractors(tmp_path)
    transform = build_transforms("imagenet", train=False, resize=24, crop=None)  # Resize([24, 24])
    (s,) = get_eval_sets("roxford5k", root=tmp_path, transform=transform, distractors=True)
    return s


def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="small_cnn", pretrained=False, width=4, pooling="gem", layer_norm=False,
                                   embedding_size=8)).eval()


def stack(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_embeddings_and_scores_of_a_benchmark(benchmark):
    net = model()
    emb = embed_landmark_set(net, benchmark, batch_size=4, progress=False)
    torch.testing.assert_close(emb["query"], net(stack(benchmark.query)))
    assert emb["gallery"].shape == (6, 8) and emb["distractors"].shape == (3, 8)
    res = evaluate_landmark_set(net, benchmark, batch_size=4, progress=False)
    ref = evaluate_revisited(emb["query"], emb["gallery"], benchmark.gnd, distractor_embeddings=emb["distractors"],
                             progress=False)
    assert res.summary == ref.summary and res.settings["benchmark"] == "roxford5k"


def test_multiscale_and_query_expansion(benchmark):
    net = model()
    scales = (1.0, 0.5)
    emb = embed_landmark_set(net, benchmark, batch_size=2, scales=scales, progress=False)
    torch.testing.assert_close(emb["gallery"], multiscale_embeddings(net, stack(benchmark.gallery), scales))
    res = evaluate_landmark_set(net, benchmark, scales=scales, query_expansion=(2, 3.0), progress=False)
    database = torch.cat([emb["gallery"], emb["distractors"]])
    expanded = alpha_query_expansion(emb["query"], database, k=2, alpha=3.0)
    ref = evaluate_revisited(expanded, emb["gallery"], benchmark.gnd, distractor_embeddings=emb["distractors"], progress=False)
    assert res.summary == ref.summary
    assert res.settings["scales"] == [1.0, 0.5] and res.settings["query_expansion"] == [2, 3.0]
    with pytest.raises(ValueError, match="no ground truth"):
        embed_landmark_set(net, type(benchmark)("plain", benchmark.query))

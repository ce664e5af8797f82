"""What the GPU paths of evaluation need, checked on a CPU: every tensor they create takes its
device from the inputs, the training's autocast dtype reaches the embedding pass, the CUDA chunk
follows the free memory, bf16 and faiss are only taken where they run natively."""

import sys
import types
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import KS, clustered  # noqa: E402

import hapkit.evaluate as ev  # noqa: E402
from hapkit.evaluate import cuda_chunk_size, evaluate, extract_embeddings  # noqa: E402

FACTORIES = {torch.full, torch.zeros, torch.ones, torch.empty, torch.arange, torch.tensor, torch.linspace, torch.eye}


class ImplicitDevices(TorchFunctionMode):
    """Records the tensor factories called from hapkit without a device: on a GPU such a tensor
    lands on the CPU next to the inputs' CUDA tensors."""

    def __init__(self):
        super().__init__()
        self.found = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            if "hapkit" in frame.f_code.co_filename:
                self.found.add(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
        return func(*args, **kwargs)


def test_every_tensor_the_evaluation_creates_names_its_device():
    emb, labels = clustered(n=60, seed=3)
    distractors = torch.nn.functional.normalize(torch.randn(5, emb.shape[1]), dim=1)
    with ImplicitDevices() as mode:
        evaluate(emb, labels, ks=KS, progress=False)
        evaluate(emb[:20], labels[:20], gallery_embeddings=emb, gallery_labels=labels,
                 distractor_embeddings=distractors, gallery_exclude=torch.arange(20), ks=KS, progress=False)
        evaluate(emb, labels, metrics=["R@k", "P@1"], ks=KS, progress=False, use_faiss=False)
        evaluate(emb[:20], labels[:20], gallery_embeddings=emb, gallery_labels=labels, distractor_embeddings=distractors,
                 metrics=["R@k", "P@1"], ks=KS, progress=False, use_faiss=False)
    assert not mode.found, sorted(mode.found)


class DtypeProbe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.seen = []

    def forward(self, x):
        y = self.lin(x)
        self.seen.append(y.dtype)
        return y


def test_the_training_amp_dtype_reaches_the_embedding_pass():
    loader = [(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long))]
    model = DtypeProbe()
    extract_embeddings(model, loader, device="cpu", amp=torch.bfloat16, progress=False)
    extract_embeddings(model, loader, device="cpu", amp=True, progress=False)  # True: CUDA only, float16
    assert model.seen == [torch.bfloat16, torch.float32]


def test_the_engine_passes_its_amp_dtype_to_evaluation(monkeypatch, tmp_path):
    from test_training_engine import TinySet, eval_sets, tiny_cfg

    import hapkit.training.engine as engine

    seen = {}
    monkeypatch.setattr(engine, "evaluate_model", lambda *a, **kw: seen.update(kw) or {})
    trainer = engine.Trainer(tiny_cfg("train.amp=bf16"), out_dir=tmp_path, train_set=TinySet(),
                             eval_sets=eval_sets(), progress=False)
    trainer.evaluate()
    assert seen["amp"] is False  # CPU evaluation stays in float32
    trainer.device = torch.device("cuda", 0)  # what a CUDA run hands over (no kernel runs here)
    trainer.evaluate()
    assert seen["amp"] is torch.bfloat16


def test_the_cuda_chunk_follows_free_memory_levels_and_relevant_counts():
    gib = 2**30
    flat = cuda_chunk_size(16 * gib, 50_000, 3, 50, 50_000)
    shared_root = cuda_chunk_size(16 * gib, 50_000, 7, 50_000, 50_000)
    assert shared_root < flat and cuda_chunk_size(32 * gib, 50_000, 7, 50_000, 50_000) == pytest.approx(2 * shared_root, abs=1)
    assert cuda_chunk_size(16 * gib, 50_000, 7, 50_000, 50_000) < cuda_chunk_size(16 * gib, 50_000, 3, 50_000, 50_000)
    # the working set of a chunk stays within half of the free memory, at 3 and at 7 levels
    for levels, relevant in ((3, 50), (7, 50_000)):
        q = cuda_chunk_size(16 * gib, 50_000, levels, relevant, 50_000)
        assert q * (40 * 50_000 + relevant * (64 + 48 * levels)) <= 8 * gib
    assert cuda_chunk_size(1000, 50_000, 7, 50_000, 50_000) == 1  # at least one query
    assert cuda_chunk_size(80 * gib, 100, 1, 1, 30) == 30  # never more than the queries


def test_evaluate_sizes_cuda_chunks_from_mem_get_info(monkeypatch):
    emb, labels = clustered(n=60, seed=3)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (10**6, 10**9))
    inputs = ev._check_inputs(emb, labels, None, None, None)
    plan = ev._plan(inputs, None, None, "pop", 1.0, None, KS, None, "cuda:0", False)
    relevant = int(ev._counts_at_levels(labels[:, -1:], labels[:, -1:], None).max())
    assert asked and plan.chunk_size == cuda_chunk_size(10**6, 60, labels.shape[1], relevant, 60)


def test_faiss_runs_on_the_gpu_or_not_at_all_there(monkeypatch):
    cpu_only = types.SimpleNamespace(IndexFlatIP=lambda d: ("cpu index", d))
    assert ev._faiss_index(cpu_only, 8, torch.device("cpu")) == ("cpu index", 8)
    assert ev._faiss_index(cpu_only, 8, torch.device("cuda", 1)) is None
    gpu = types.SimpleNamespace(IndexFlatIP=lambda d: ("cpu index", d), StandardGpuResources=lambda: "res",
                                index_cpu_to_gpu=lambda res, dev, index: ("gpu index", dev, index))
    assert ev._faiss_index(gpu, 8, torch.device("cuda", 1)) == ("gpu index", 1, ("cpu index", 8))
    # without GPU support the CUDA evaluation ranks with torch instead of copying chunks to the host
    monkeypatch.setattr(ev, "_faiss", lambda: cpu_only)
    emb, labels = clustered(n=60, seed=3)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**9, 10**9))
    inputs = ev._check_inputs(emb, labels, None, None, None)
    assert not ev._plan(inputs, ["R@k"], None, "pop", 1.0, None, KS, None, "cuda:0", True).use_faiss
    assert ev._plan(inputs, ["R@k"], None, "pop", 1.0, None, KS, None, "cpu", True).use_faiss


@pytest.mark.parametrize("emulated, want", [(True, torch.float16), (False, torch.bfloat16)])
def test_amp_auto_takes_bf16_only_where_it_is_native(monkeypatch, emulated, want):
    from hapkit.training.engine import resolve_amp

    # emulated: a GPU whose bf16 counts as supported only when emulation counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or not emulated)
    assert resolve_amp("auto", torch.device("cuda", 0)) == want
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # an older torch: no keyword
    assert resolve_amp("auto", torch.device("cuda", 0)) == torch.bfloat16


class HostCopies(TorchFunctionMode):
    """Counts the copies to the host that hapkit asks for whatever the inputs' device
    (``.cpu()``, ``.to("cpu")``; a ``.to(device)`` of the inputs' device is not one): on a GPU
    each one synchronises and moves the work it feeds to the CPU."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is torch.Tensor.cpu or (
            func is torch.Tensor.to and "cpu" in (*args[1:], kwargs.get("device")))
        frame = sys._getframe(1)
        if to_host and "hapkit" in frame.f_code.co_filename:
            self.found.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}")
        return func(*args, **kwargs)


def revisited_problem():
    from test_evaluate_revisited import random_problem

    q, g, gnd = random_problem(num_queries=9, num_gallery=40)
    distractors = torch.nn.functional.normalize(torch.randn(7, g.shape[1], generator=torch.Generator().manual_seed(1)),
                                                dim=1)
    return q, g, gnd, distractors


def test_every_tensor_the_revisited_protocol_and_query_expansion_create_names_its_device():
    q, g, gnd, distractors = revisited_problem()
    with ImplicitDevices() as mode:
        ev.evaluate_revisited(q, g, gnd, ks=(1, 5), distractor_embeddings=distractors, chunk_size=2, progress=False)
        ev.evaluate_revisited(q, g, gnd, ap="standard", progress=False)
        ev.alpha_query_expansion(q, torch.cat([g, distractors]), k=3, alpha=3.0, chunk_size=4)
    assert not mode.found, sorted(mode.found)


def test_the_revisited_protocol_stays_on_the_device_until_its_one_read_back():
    q, g, gnd, distractors = revisited_problem()
    with HostCopies() as mode:
        res = ev.evaluate_revisited(q, g, gnd, distractor_embeddings=distractors, chunk_size=2, progress=False)
        expanded = ev.alpha_query_expansion(q, g, k=3, alpha=3.0, chunk_size=4)
    # the per-query table comes back once, after the last of the five chunks
    assert len(mode.found) == 1, mode.found
    assert res.settings["device"] == "cpu" and expanded.device == q.device


def test_a_landmark_benchmark_is_scored_on_the_device_it_is_embedded_on(monkeypatch):
    import hapkit.training.landmarks as landmarks

    q, g, gnd, distractors = revisited_problem()
    eval_set = types.SimpleNamespace(name="bench", gnd=gnd, query=q, gallery=g, distractors=distractors)
    monkeypatch.setattr(landmarks, "_embed", lambda model, ds, *a, **kw: ds)  # CPU rows, as extraction returns
    seen = {}

    def record(name, result):
        def fn(*args, **kwargs):
            seen[name] = kwargs.get("device")
            return result(*args, **kwargs) if callable(result) else result
        return fn

    monkeypatch.setattr(landmarks, "alpha_query_expansion", record("qe", lambda queries, *a, **kw: queries))
    monkeypatch.setattr(landmarks, "evaluate_revisited", record("score", ev.RetrievalResults({}, None, 0)))
    landmarks.evaluate_landmark_set(torch.nn.Linear(2, 2), eval_set, device="cuda:0", query_expansion=(2, 3.0),
                                    progress=False)
    assert seen == {"qe": torch.device("cuda", 0), "score": torch.device("cuda", 0)}
    landmarks.evaluate_landmark_set(torch.nn.Linear(2, 2), eval_set, query_expansion=(2, 3.0), progress=False)
    assert seen == {"qe": torch.device("cpu"), "score": torch.device("cpu")}  # the model's device

"""Is data loading the bottleneck when training on the generated dataset? One run answers it.

Measures, on the same batch size:

- loader: images/s of the generated dataset through ``DataLoader`` with the train transform
  (random crop + flip + normalise) and hapkit's ``MPerClassBatchSampler``, for each
  ``--workers`` value (first batch excluded: worker start-up);
- model: images/s of one training step of the small CNN (forward + backward + Adam step) on a
  batch already in memory (``hapkit.training.models.SmallCNN`` when available, else an equivalent CNN
  defined here);

and prints ratio = loader images/s / model images/s. A ratio above 1 means the loader keeps up
with the model (the step time, not the data, bounds training speed).

``--learn-steps N`` also checks that the dataset is learnable: the small CNN is trained for N
steps with pytorch-metric-learning's TripletMarginLoss (semi-hard triplets, fine labels, batches of
4 images per class) and R@1 of nearest-neighbour retrieval is reported at every level of the TEST
split (fine classes never seen in training), untrained and after each epoch.

    python benchmarks/bench_data.py                        # batch 128, workers 0 and 2
    python benchmarks/bench_data.py --batch-size 256 --workers 0 1 2 --batches 40
    python benchmarks/bench_data.py --workers 0 --learn-steps 160 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def small_cnn(embedding: int = 128) -> nn.Module:
    """The small CNN used to train on the generated dataset, with an embedding head."""
    try:
        from hapkit.training.models import SmallCNN

        trunk = SmallCNN(32)
        width = trunk.num_features
    except ImportError:  # standalone fallback: same architecture
        chans, layers = [3, 32, 64, 128, 256], []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            layers += [nn.MaxPool2d(2)] if i < 3 else []
        trunk, width = nn.Sequential(*layers), chans[-1]
    return nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, embedding))


def loader_throughput(dataset, batch_size: int, workers: int, batches: int, seed: int = 0) -> float:
    """Images per second delivered by the DataLoader (first batch not timed)."""
    from hapkit.data import MPerClassBatchSampler

    sampler = MPerClassBatchSampler(dataset.labels, batch_size=batch_size, m=4, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    n_images, start, epoch = 0, None, 0
    while True:
        sampler.set_epoch(epoch)
        for k, (images, _) in enumerate(loader):
            if start is None:
                start = time.perf_counter()  # after the first batch: workers are up
                continue
            n_images += images.shape[0]
            if n_images >= batches * batch_size:
                return n_images / (time.perf_counter() - start)
        epoch += 1


def model_throughput(batch_size: int, image_size: int, repeats: int) -> float:
    """Images per second of forward + backward + optimiser step of the small CNN."""
    torch.manual_seed(0)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size)
    times = []
    for k in range(repeats + 1):
        start = time.perf_counter()
        emb = nn.functional.normalize(model(x), dim=1)
        loss = (emb @ emb.T).mean()  # the loss's own cost is not what is measured here
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k:  # the first step allocates and is not timed
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def recall_at_1(model: nn.Module, dataset, batch_size: int = 512) -> list[float]:
    """Same-set nearest-neighbour R@1 at each level (cosine similarity, the query excluded)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        emb = torch.cat([
            nn.functional.normalize(model(x), dim=1)
            for x, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        ])
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    nearest = sim.argmax(dim=1).numpy()
    model.train(was_training)
    labels = dataset.labels
    return [float((labels[nearest, c] == labels[:, c]).mean()) for c in range(labels.shape[1])]


def learnability(train_set, test_set, steps: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Train the small CNN with a triplet loss for ``steps`` steps; R@1 per level on the test set."""
    from pytorch_metric_learning import losses, miners

    from hapkit.data import MPerClassBatchSampler

    torch.manual_seed(seed)
    model = small_cnn()
    loss_fn = losses.TripletMarginLoss(margin=0.1)
    miner = miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = MPerClassBatchSampler(train_set.labels, batch_size=batch_size, m=4, seed=seed)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler)
    history = [{"steps": 0, "seconds": 0.0, "R@1": recall_at_1(model, test_set)}]
    start, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            emb = nn.functional.normalize(model(images), dim=1)
            loss = loss_fn(emb, labels[:, 0], miner(emb, labels[:, 0]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
        epoch += 1
        elapsed = time.perf_counter() - start
        history.append({"steps": step, "seconds": elapsed, "R@1": recall_at_1(model, test_set)})
    return history


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=20, help="timed batches per loader measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=10, help="timed model steps (median)")
    p.add_argument("--images-per-class", type=int, default=80)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cache", default=None, help="generated-data cache directory")
    p.add_argument("--learn-steps", type=int, default=0, help="also train for this many steps and report R@1")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hapkit.data import get_dataset
    from hapkit.data.transforms import build_transforms

    ds = get_dataset(
        "generated", root=args.cache, split="train", transform=build_transforms("generated", train=True),
        images_per_class=args.images_per_class,
    )
    size = ds.images.shape[1]
    model_ips = model_throughput(args.batch_size, size, args.repeats)
    results = {"model_images_per_s": model_ips, "loader": {}}
    print(
        f"generated dataset: {len(ds)} train images of {size} px, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"small CNN train step: {model_ips:8.0f} images/s ({args.batch_size / model_ips * 1e3:.1f} ms/batch)")
    print(f"{'workers':>8} {'loader images/s':>16} {'ratio loader/model':>19}")
    for w in args.workers:
        ips = loader_throughput(ds, args.batch_size, w, args.batches)
        results["loader"][w] = {"images_per_s": ips, "ratio": ips / model_ips}
        print(f"{w:>8} {ips:>16.0f} {ips / model_ips:>19.2f}")
    if args.learn_steps:
        test = get_dataset(
            "generated", root=args.cache, split="test", transform=build_transforms("generated", train=False),
            images_per_class=args.images_per_class,
        )
        print(f"learnability: R@1 on the test split ({', '.join(test.level_names)})")
        results["learn"] = learnability(ds, test, args.learn_steps, args.batch_size)
        for row in results["learn"]:
            r1 = "  ".join(f"{v:.3f}" for v in row["R@1"])
            print(f"  after {row['steps']:>4} steps ({row['seconds']:5.0f} s): {r1}")
    return results


if __name__ == "__main__":
    main()

"""Datasets with tree labels, batch samplers and transforms.

- :func:`get_dataset` / :func:`get_eval_sets` by name: "generated" (embedded, no download),
  "sop", "inaturalist", "inaturalist_full", "dyml_vehicle", "dyml_animal", "dyml_product",
  "cub", "cub_hierarchy", "cifar100"; landmarks: "roxford5k", "rparis6k" (revisited
  benchmarks with their ground truth), "revisitop1m" (R1M distractors), "sfm120k", "gldv2",
  "gldv2_hier" (training sets).
- :func:`prepare` downloads / lays out a real dataset (``hapkit prepare-data NAME --root DIR``).
- :class:`HierarchicalBatchSampler`, :class:`MPerClassBatchSampler`: seeded batch samplers
  with resume.
- :func:`hapkit.data.transforms.build_transforms`: the official and the generated-data transforms;
  :mod:`hapkit.data.builder`: datasets and transforms from a recipe's ``data`` section.
- :class:`EmbeddingSet`: embeddings of a dataset's images with their labels, for figures.
"""

from hapkit._lazy import lazy_exports

# Names are imported from their submodule on first use: the command line reads the dataset names
# (registry) to build its parser, and must not pay for torch, torchvision and every loader for that.
_WHERE = {
    **dict.fromkeys(
        ["AnnotationError", "DataError", "DatasetNotFoundError", "EvalSet", "HierarchicalDataset",
         "ImageFileDataset", "ImageReadError", "InMemoryImageDataset", "spread_indices", "spread_subset"],
        "base",
    ),
    **dict.fromkeys(["build_eval_sets", "build_split", "build_train_set", "recipe_transform"], "builder"),
    **dict.fromkeys(["EmbeddingSet", "label_frame"], "embeddings"),
    "prepare": "preparation",
    **dict.fromkeys(["DATASETS", "dataset_info", "dataset_names", "get_dataset", "get_eval_sets"], "registry"),
    **dict.fromkeys(["HierarchicalBatchSampler", "MPerClassBatchSampler"], "samplers"),
    "build_transforms": "transforms",
}

__all__ = [
    "get_dataset",
    "get_eval_sets",
    "prepare",
    "dataset_names",
    "dataset_info",
    "DATASETS",
    "HierarchicalDataset",
    "ImageFileDataset",
    "InMemoryImageDataset",
    "EvalSet",
    "HierarchicalBatchSampler",
    "MPerClassBatchSampler",
    "build_transforms",
    "recipe_transform",
    "build_split",
    "build_train_set",
    "build_eval_sets",
    "spread_indices",
    "spread_subset",
    "EmbeddingSet",
    "label_frame",
    "DataError",
    "DatasetNotFoundError",
    "AnnotationError",
    "ImageReadError",
]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

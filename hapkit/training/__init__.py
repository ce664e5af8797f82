"""The training wing: recipes as data, models, optimisers, the training loop and cached runs.

- :mod:`hapkit.training.config` (typed recipes) and :mod:`hapkit.training.recipes` (the YAML files);
- :mod:`hapkit.training.models` (backbone -> pooling -> head), :mod:`hapkit.training.optim`;
- :mod:`hapkit.training.engine` (the loop: :func:`train`, :class:`Trainer`), with
  :mod:`hapkit.training.loading`, :mod:`hapkit.training.distributed` and
  :mod:`hapkit.training.checkpoint`;
- :mod:`hapkit.training.runs`: cached training of a recipe, checkpoints -> models, embeddings.

This wing imports nothing of :mod:`hapkit.viz`. Names are imported on first use, so that
``import hapkit.training`` stays cheap.
"""

from hapkit._lazy import lazy_exports

_WHERE = {
    "train": "engine",
    "Trainer": "engine",
    "TrainResult": "engine",
    "Callback": "engine",
    "load_recipe": "recipes",
    "list_recipes": "recipes",
    "build_model": "models",
    "trained_embeddings": "runs",
    "untrained_embeddings": "runs",
    "train_cached": "runs",
    "load_model": "runs",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

"""Training recipes as data: one YAML file per (method, dataset), named ``<method>_<dataset>``.

A recipe file holds the sections of :class:`hapkit.training.config.Recipe`. It may start with
``extends: <other recipe>``: the other recipe is read first and this file's values replace its
values key by key (nested sections are merged, lists and scalars are replaced; a ``loss`` with
another ``name`` replaces the parent's loss section whole, keyword arguments included). This keeps
the files that derive a setting from a published one short and explicit about their origin.

>>> from hapkit.training.recipes import load_recipe, list_recipes
>>> cfg = load_recipe("happier", dataset="generated", overrides=["optim.lr=1e-3"])
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from hapkit.training.config import ConfigError, Recipe, apply_overrides, from_dict, validate_recipe

__all__ = [
    "RECIPE_DIR",
    "list_recipes",
    "recipe_path",
    "read_recipe_dict",
    "load_recipe",
    "resolve_name",
    "resolved_recipe",
    "published_numbers",
]

RECIPE_DIR = Path(__file__).resolve().parent


def list_recipes() -> list[str]:
    """Names of the bundled recipes, sorted."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_name(recipe: str, dataset: str | None = None) -> str:
    """The bundled recipe name for a method (``"happier"``) and dataset (``"sop"``), or a full name."""
    names = set(list_recipes())
    if dataset:
        key = f"{recipe}_{dataset}".lower().replace("-", "_")
        if key in names:
            return key
        # a dataset given by its hapkit.data name (e.g. cub_hierarchy for the cub recipes)
        for name in sorted(names):
            if name.startswith(f"{recipe}_"):
                data = read_recipe_dict(name)
                if data.get("method") == recipe and (data.get("data") or {}).get("dataset") == dataset:
                    return name
    if recipe in names:
        return recipe
    methods = set()
    for n in names:
        found = re.search(r"^method:\s*(\S+)", (RECIPE_DIR / f"{n}.yaml").read_text(), re.M)
        if found:
            methods.add(found.group(1))
    methods = sorted(methods)
    wanted = f"{recipe}_{dataset}" if dataset else recipe
    raise ConfigError(
        f"no recipe named {wanted!r}. Bundled recipes are <method>_<dataset> with methods "
        f"{', '.join(methods)}; run `hapkit recipes` to list them, or pass the path of a YAML file."
    )


def recipe_path(recipe: str, dataset: str | None = None) -> Path:
    """Path of a bundled recipe, or ``recipe`` itself when it is an existing YAML file."""
    p = Path(recipe)
    if p.suffix in {".yaml", ".yml"}:
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        return p
    return RECIPE_DIR / f"{resolve_name(recipe, dataset)}.yaml"


def _merge(base: dict, update: dict, top: bool = True) -> dict:
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        # another loss brings its own keyword arguments: the parent's would not fit it
        new_loss = top and key == "loss" and isinstance(value, dict) and isinstance(old, dict) \
            and "name" in value and value["name"] != old.get("name")
        if isinstance(value, dict) and isinstance(old, dict) and not new_loss:
            out[key] = _merge(old, value, top=False)
        else:
            out[key] = value
    return out


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report (problem, context, a caret under the text) as one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())


# Listing the recipes parses every bundled file and its parents; libyaml does that several times
# faster. Files of the user keep the pure-Python parser, the one whose messages errors quote.
_BUNDLED_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _parse(path: Path):
    text = path.read_text()
    if path.parent.resolve() == RECIPE_DIR:
        try:
            return yaml.load(text, Loader=_BUNDLED_LOADER)
        except yaml.YAMLError:
            pass  # reported below, in the words of the reference parser
    return yaml.safe_load(text)


def read_recipe_dict(recipe: str, dataset: str | None = None, _seen: tuple = ()) -> dict:
    """The recipe as a plain dict with ``extends`` resolved (not yet type-checked)."""
    path = recipe_path(recipe, dataset)
    try:
        data = _parse(path) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None:
        seen = _seen + (path.resolve(),)
        if recipe_path(str(parent)).resolve() in seen:
            raise ConfigError(f"recipe {path}: circular 'extends' through {parent!r}")
        base = read_recipe_dict(str(parent), None, seen)
        base.pop("name", None)
        base.pop("description", None)
        base.pop("reported", None)  # published numbers belong to one (method, dataset) only
        data = _merge(base, data)
    data.setdefault("name", path.stem)
    return data


def published_numbers() -> "pd.DataFrame":
    """Every number the papers publish for a bundled recipe (its ``reported:`` section, %): one
    row per (recipe, metric) with columns recipe, method, dataset, metric (the summary key it is
    compared with, e.g. ``test/R@1@0``), paper and description."""
    import pandas as pd

    rows = []
    for name in list_recipes():
        data = read_recipe_dict(name)
        for metric, value in (data.get("reported") or {}).items():
            rows.append({"recipe": name, "method": data.get("method"), "dataset": (data.get("data") or {}).get("dataset"),
                         "metric": metric, "paper": float(value), "description": data.get("description", "")})
    return pd.DataFrame(rows, columns=["recipe", "method", "dataset", "metric", "paper", "description"])


def _check_overrides(overrides) -> None:
    if overrides is None:
        return
    if isinstance(overrides, dict):
        keys = list(overrides)
    elif isinstance(overrides, (list, tuple)):
        keys = list(overrides)
    else:
        keys = [None]
    bad = [k for k in keys if not isinstance(k, str)]
    if bad:
        raise ConfigError(
            f"overrides must be a list of 'section.key=value' strings or a mapping from 'section.key' "
            f"to values, got {overrides!r}"
        )


def load_recipe(recipe: str, dataset: str | None = None, overrides=None) -> Recipe:
    """Read, type-check, range-check and override a recipe (the overridden recipe is checked again).

    ``recipe`` is a bundled name (``"happier_sop"``), a method with ``dataset`` (``"happier"``,
    ``"sop"``) or a path to a YAML file. ``overrides`` are ``"section.key=value"`` strings or a
    mapping, e.g. ``["optim.lr=1e-5", "train.epochs=3"]``.
    """
    _check_overrides(overrides)
    data = read_recipe_dict(recipe, dataset)
    try:
        cfg = validate_recipe(from_dict(Recipe, data))
    except ConfigError as e:
        raise ConfigError(f"recipe {data.get('name', recipe)!r}: {e}") from None
    return apply_overrides(cfg, overrides)


def resolved_recipe(cfg: Recipe) -> dict:
    """Every field of ``cfg`` (``extends:`` applied) plus what the engine builds from it, as plain
    data: ``resolved.optimizers`` (the settings of every parameter group, ``follow:`` resolved)
    and ``resolved.transforms`` (the torchvision steps of the train and test pipelines)."""
    import hapkit.losses as losses
    from hapkit.data.builder import recipe_transform
    from hapkit.data.transforms import describe_transforms
    from hapkit.training.config import group_settings, network_groups, to_dict

    groups = list(network_groups(cfg.optim))
    loss_cls = getattr(losses, cfg.loss.name, None)
    if getattr(loss_cls, "has_parameters", False):
        groups.append(loss_cls.parameter_group)
    return {
        **to_dict(cfg),
        "resolved": {
            "optimizers": {g: group_settings(cfg.optim, g) for g in groups},
            "transforms": {
                "train": describe_transforms(recipe_transform(cfg.data, train=True)),
                "test": describe_transforms(recipe_transform(cfg.data, train=False)),
            },
        },
    }

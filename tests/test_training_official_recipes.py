"""Every official recipe equals the authors' configuration, setting by setting.

The tables below are typed from the official files (elias-ramzi/HAPPIER ``happier/config/``,
elias-ramzi/ROADMAP ``roadmap/config/`` and their README commands, resolved as Hydra does), each
value with the file it comes from. They are compared with the resolved recipe (``hapkit recipes
--show``) and with the objects the engine builds from it: optimisers and their parameter groups,
schedulers, samplers and transforms.
"""

import numpy as np
import pytest
import torch

from hapkit.training.config import ConfigError
from hapkit.training.engine import build_loss, build_sampler, parameter_groups
from hapkit.training.models import build_model
from hapkit.training.optim import build_optimizers
from hapkit.training.recipes import load_recipe, resolved_recipe

H = "happier/config/"
R = "roadmap/config/"
S = "suprank/config/"
N = "naver/deep-image-retrieval "
SOP_TRAIN = [("Resize", [256]), ("RandomResizedCrop", [224, 224]), ("RandomHorizontalFlip", None)]
SOP_TEST = [("Resize", [256, 256]), ("CenterCrop", [224, 224])]
INAT_TRAIN = [("RandomResizedCrop", [224, 224]), ("RandomHorizontalFlip", None)]
INAT_TEST = [("Resize", [256]), ("CenterCrop", [224, 224])]

# recipe -> {dotted key: (official value, source)}
OFFICIAL = {
    "happier_sop": {
        "seed": (0, "README: experience.seed=0"),
        "model.backbone": ("resnet50", H + "model/resnet_ln.yaml"),
        "model.pretrained": ("required", H + "model/resnet_ln.yaml: pretrained True"),
        "model.pooling": ("avg", H + "model/resnet_ln.yaml: pooling default (AdaptiveAvgPool2d)"),
        "model.layer_norm": (True, H + "model/resnet_ln.yaml: norm_features True"),
        "model.embedding_size": (512, H + "model/resnet_ln.yaml: embed_dim"),
        "model.freeze_batchnorm": (True, H + "model/resnet_ln.yaml"),
        "data.sampler": ("hierarchical", H + "dataset/sop.yaml: HierarchicalSampler"),
        "data.batch_size": (256, H + "dataset/sop.yaml"),
        "data.samples_per_class": (4, H + "dataset/sop.yaml"),
        "data.super_classes_per_batch": (2, H + "dataset/sop.yaml"),
        "data.batches_per_super_tuple": (5, H + "dataset/sop.yaml"),
        "resolved.optimizers.backbone.optimizer": ("adam", H + "optimizer/sop.yaml: opt.0 Adam"),
        "resolved.optimizers.backbone.lr": (5e-5, H + "optimizer/sop.yaml"),
        "resolved.optimizers.backbone.weight_decay": (1e-4, H + "optimizer/sop.yaml"),
        "resolved.optimizers.backbone.scheduler": ("cosine", H + "optimizer/sop.yaml: CosineAnnealingLR"),
        "resolved.optimizers.backbone.eta_min": (0.0, H + "optimizer/sop.yaml"),
        "resolved.optimizers.head.lr": (1e-4, H + "optimizer/sop.yaml: ${mult:2,opt.0.lr}"),
        "resolved.optimizers.head.weight_decay": (1e-4, H + "optimizer/sop.yaml"),
        "resolved.optimizers.head.eta_min": (0.0, H + "optimizer/sop.yaml"),
        "resolved.optimizers.loss.optimizer": ("adam", H + "loss/HAPPIER_SOP.yaml"),
        "resolved.optimizers.loss.lr": (10.0, H + "loss/HAPPIER_SOP.yaml"),
        "resolved.optimizers.loss.weight_decay": (0.0, H + "loss/HAPPIER_SOP.yaml"),
        "resolved.optimizers.loss.eta_min": (0.1, H + "loss/HAPPIER_SOP.yaml"),
        "train.epochs": (100, "README: experience.max_iter=100"),
        "train.warmup_epochs": (5, "README: experience.warmup_step=5"),
        "train.warmup_frozen": (["backbone"], H + "experience/default.yaml: warmup_keys"),
        "train.warmup_schedules": (False, "happier/engine/train.py: schedulers step after the warm-up"),
        "train.amp": ("fp16", "happier/run.py: GradScaler with with_autocast"),
        "optim.grad_clip": (None, H + "experience/default.yaml: gradient_clipping_norm null"),
        "loss.name": ("HAPPIER", H + "loss/HAPPIER_SOP.yaml"),
        "loss.kwargs.lambda_": (0.1, H + "loss/HAPPIER_SOP.yaml: weights 0.9 / 0.1"),
        "loss.kwargs.tau": (0.01, H + "loss/HAPPIER_SOP.yaml"),
        "loss.kwargs.rho": (100.0, H + "loss/HAPPIER_SOP.yaml"),
        "loss.kwargs.delta": (0.05, H + "loss/HAPPIER_SOP.yaml"),
        "loss.kwargs.start": (0.5, H + "loss/HAPPIER_SOP.yaml"),
        "loss.kwargs.offset": (1.44, H + "loss/HAPPIER_SOP.yaml"),
        "loss.kwargs.temperature": (0.05, "happier/losses/cluster_loss.py default"),
        "transforms.train": (SOP_TRAIN, H + "transform/sop.yaml"),
        "transforms.test": (SOP_TEST, H + "transform/sop.yaml"),
        "eval.every": (20, H + "experience/default.yaml: test_eval_freq"),
        "eval.columns": ([0, 1], "README: compute_for_hierarchy_levels=[0,1]"),
    },
    "happier_inaturalist": {
        "data.dataset": ("inaturalist", "README: dataset=inat_base"),
        "data.sampler": ("m_per_class", H + "dataset/inat_base.yaml: MPerClassSampler"),
        "data.batch_size": (256, H + "dataset/inat_base.yaml"),
        "data.samples_per_class": (4, H + "dataset/inat_base.yaml"),
        "data.m_per_class_fill": ("passes", "happier/datasets/samplers/m_per_class_sampler.py"),
        "model.layer_norm": (True, H + "model/resnet_ln.yaml"),
        "resolved.optimizers.backbone.lr": (1e-5, H + "optimizer/inat.yaml"),
        "resolved.optimizers.backbone.weight_decay": (4e-4, H + "optimizer/inat.yaml"),
        "resolved.optimizers.backbone.eta_min": (1e-6, H + "optimizer/inat.yaml"),
        "resolved.optimizers.head.lr": (2e-5, H + "optimizer/inat.yaml"),
        "resolved.optimizers.loss.optimizer": ("adam", H + "loss/HAPPIER_inat.yaml: ${optimizer.opt.1}"),
        "resolved.optimizers.loss.lr": (2e-5, H + "loss/HAPPIER_inat.yaml: ${optimizer.opt.1}"),
        "resolved.optimizers.loss.weight_decay": (4e-4, H + "loss/HAPPIER_inat.yaml: ${optimizer.opt.1}"),
        "resolved.optimizers.loss.eta_min": (1e-6, H + "loss/HAPPIER_inat.yaml: ${optimizer.opt.1}"),
        "loss.kwargs.start": (0.0, H + "loss/HAPPIER_inat.yaml"),
        "loss.kwargs.offset": (1.0, H + "loss/HAPPIER_inat.yaml"),
        "train.epochs": (100, H + "experience/default.yaml: max_iter"),
        "train.warmup_epochs": (5, "README: experience.warmup_step=5"),
        "transforms.train": (INAT_TRAIN, H + "transform/inat.yaml"),
        "transforms.test": (INAT_TEST, H + "transform/inat.yaml"),
        "eval.columns": ([0, 1], "README: compute_for_hierarchy_levels=[0,1]"),
    },
    "happier_inaturalist_full": {
        "data.dataset": ("inaturalist_full", "README: dataset=inat_full"),
        "eval.columns": ([0, 1, 2, 3, 4, 5, 6], "README: compute_for_hierarchy_levels=[0,...,6]"),
        "resolved.optimizers.loss.lr": (2e-5, H + "loss/HAPPIER_inat.yaml"),
    },
    "happier_dyml_vehicle": {
        "model.backbone": ("resnet34", H + "model/dyml_resnet34.yaml"),
        "model.pretrained": (False, H + "model/dyml_resnet34.yaml"),
        "model.freeze_batchnorm": (False, H + "model/dyml_resnet34.yaml"),
        "model.layer_norm": (True, H + "model/dyml_resnet34.yaml"),
        "data.sampler": ("m_per_class", H + "dataset/dyml_vehicle.yaml"),
        "data.batch_size": (256, H + "dataset/dyml_vehicle.yaml"),
        "optim.network": ("single", H + "optimizer/dyml.yaml: one group, params null"),
        "resolved.optimizers.net.optimizer": ("sgd", H + "optimizer/dyml.yaml"),
        "resolved.optimizers.net.lr": (0.1, H + "optimizer/dyml.yaml"),
        "resolved.optimizers.net.momentum": (0.9, H + "optimizer/dyml.yaml"),
        "resolved.optimizers.net.nesterov": (True, H + "optimizer/dyml.yaml"),
        "resolved.optimizers.net.weight_decay": (1e-4, H + "optimizer/dyml.yaml"),
        "resolved.optimizers.net.eta_min": (1e-6, H + "optimizer/dyml.yaml"),
        "resolved.optimizers.loss.lr": (0.1, H + "loss/HAPPIER.yaml: ${optimizer.opt.0}"),
        "resolved.optimizers.loss.optimizer": ("sgd", H + "loss/HAPPIER.yaml: ${optimizer.opt.0}"),
        "loss.kwargs.lambda_": (0.1, H + "loss/HAPPIER.yaml"),
        "train.warmup_epochs": (0, H + "experience/default.yaml: warmup_step null"),
        "transforms.train": (INAT_TRAIN, H + "transform/inat.yaml (transform/dyml.yaml does not exist)"),
        "transforms.test": (INAT_TEST, H + "transform/inat.yaml"),
        "eval.columns": ([0], "README: compute_for_hierarchy_levels=[0]"),
        "eval.ks": ([10, 20], "README: recall_rate=[10,20]"),
        "eval.overall": (True, "README: overall_accuracy=True"),
        "eval.metrics": (["AP", "mAP@R", "P@1", "R@k", "ASI", "ASI@"], "README: exclude=[NDCG,H-AP], with_binary_asi"),
    },
    "happier_dyml_animal": {
        "data.dataset": ("dyml_animal", "README: dataset=dyml_animal"),
        "loss.kwargs.lambda_": (0.5, H + "loss/HAPPIER_5.yaml: weights 0.5 / 0.5"),
        "resolved.optimizers.net.lr": (0.1, H + "optimizer/dyml.yaml"),
    },
    "happier_dyml_product": {
        "model.pretrained": ("required", H + "model/dyml_resnet34_product.yaml"),
        "model.freeze_batchnorm": (True, H + "model/dyml_resnet34_product.yaml"),
        "resolved.optimizers.backbone.optimizer": ("sgd", H + "optimizer/dyml_product.yaml"),
        "resolved.optimizers.backbone.lr": (0.01, H + "optimizer/dyml_product.yaml"),
        "resolved.optimizers.head.lr": (0.02, H + "optimizer/dyml_product.yaml: ${mult:2,...}"),
        "resolved.optimizers.head.eta_min": (1e-5, H + "optimizer/dyml_product.yaml"),
        "resolved.optimizers.loss.lr": (0.02, H + "loss/HAPPIER_product.yaml: ${optimizer.opt.1}"),
        "train.epochs": (20, "README: experience.max_iter=20"),
        "train.warmup_epochs": (5, "README: experience.warmup_step=5"),
        "eval.columns": ([0, 1, 2], "README: compute_for_hierarchy_levels=[0,1,2]"),
    },
    "roadmap_sop": {
        "seed": (333, "README: experience.seed=333"),
        "model.layer_norm": (False, R + "model/resnet.yaml: norm_features False"),
        "model.pooling": ("avg", R + "model/resnet.yaml"),
        "model.freeze_batchnorm": (True, R + "model/resnet.yaml"),
        "data.sampler": ("hierarchical", R + "dataset/sop.yaml"),
        "data.batch_size": (128, "README: dataset.sampler.kwargs.batch_size=128"),
        "data.batches_per_super_tuple": (10, "README: batches_per_super_pair=10"),
        "resolved.optimizers.backbone.lr": (1e-5, "docs/definitions.md, 'Official training recipes' (optimizer/sop.yaml)"),
        "resolved.optimizers.head.lr": (2e-5, "docs/definitions.md, 'Official training recipes' (optimizer/sop.yaml)"),
        "resolved.optimizers.head.scheduler": ("multistep", "docs/definitions.md, 'Official training recipes' (optimizer/sop.yaml)"),
        "resolved.optimizers.head.milestones": ([30, 70], "docs/definitions.md, 'Official training recipes' (optimizer/sop.yaml)"),
        "resolved.optimizers.head.gamma": (0.3, "docs/definitions.md, 'Official training recipes' (optimizer/sop.yaml)"),
        "train.epochs": (100, "README: experience.max_iter=100"),
        "train.warmup_epochs": (0, R + "experience/default.yaml: warm_up -1"),
        "loss.kwargs.weights": ([1.0, 1.0], R + "loss/roadmap.yaml"),
        "loss.kwargs.pos_margin": (0.9, R + "loss/roadmap.yaml"),
        "loss.kwargs.neg_margin": (0.6, R + "loss/roadmap.yaml"),
        "loss.kwargs.offset": (1.44, R + "loss/roadmap.yaml"),
        "loss.kwargs.paper_branch": (True, "roadmap/losses/smooth_rank_ap.py: rho * d + offset"),
        "transforms.train": ([("Resize", [288]), ("RandomResizedCrop", [256, 256]), ("RandomHorizontalFlip", None)],
                             R + "transform/sop_big.yaml"),
        "transforms.test": ([("Resize", [288, 288]), ("CenterCrop", [256, 256])], R + "transform/sop_big.yaml"),
        "eval.every": (5, R + "experience/default.yaml: test_eval_freq"),
    },
    "roadmap_sop_deit": {
        "model.backbone": ("deit_small_distilled", "roadmap/models/net.py: vit_deit_distilled"),
        "model.linear_head": (False, "model/deit.yaml: without_fc True"),
        "optim.network": ("single", R + "optimizer/sop_deit.yaml: params empty"),
        "resolved.optimizers.net.optimizer": ("adamw", R + "optimizer/sop_deit.yaml"),
        "resolved.optimizers.net.lr": (1e-5, R + "optimizer/sop_deit.yaml"),
        "resolved.optimizers.net.weight_decay": (5e-4, R + "optimizer/sop_deit.yaml"),
        "resolved.optimizers.net.milestones": ([25, 50], R + "optimizer/sop_deit.yaml"),
        "resolved.optimizers.net.gamma": (0.3, R + "optimizer/sop_deit.yaml"),
        "train.epochs": (75, "README: experience.max_iter=75"),
        "transforms.train": (SOP_TRAIN, R + "transform/sop.yaml"),
        "transforms.test": (SOP_TEST, R + "transform/sop.yaml"),
    },
    "roadmap_cub": {
        "data.dataset": ("cub", "README: dataset=cub"),
        "data.sampler": ("m_per_class", R + "dataset/cub.yaml"),
        "data.batch_size": (128, "README: batch_size=128"),
        "model.pooling": ("max", R + "model/resnet_max_ln.yaml"),
        "model.layer_norm": (True, R + "model/resnet_max_ln.yaml"),
        "resolved.optimizers.net.lr": (1e-6, "docs/definitions.md, 'Official training recipes' (optimizer/cub.yaml)"),
        "resolved.optimizers.net.weight_decay": (4e-4, "docs/definitions.md, 'Official training recipes' (optimizer/cub.yaml)"),
        "resolved.optimizers.net.scheduler": ("constant", "docs/definitions.md, 'Official training recipes' (optimizer/cub.yaml)"),
        "train.epochs": (200, "README: experience.max_iter=200"),
        "transforms.train": ([("RandomResizedCrop", [256, 256]), ("RandomHorizontalFlip", None)],
                             "margin_ap/config/transform/cub_big.yaml"),
        "transforms.test": ([("Resize", [288]), ("CenterCrop", [256, 256])], "margin_ap/config/transform/cub_big.yaml"),
    },
    "roadmap_cub_deit": {
        "resolved.optimizers.net.optimizer": ("adamw", R + "optimizer/cub_deit.yaml"),
        "resolved.optimizers.net.lr": (1e-6, R + "optimizer/cub_deit.yaml"),
        "resolved.optimizers.net.weight_decay": (5e-4, R + "optimizer/cub_deit.yaml"),
        "resolved.optimizers.net.scheduler": ("constant", R + "optimizer/cub_deit.yaml: no scheduler"),
        "train.epochs": (150, "README: experience.max_iter=150"),
        "transforms.train": (INAT_TRAIN, "margin_ap/config/transform/cub.yaml"),
        "transforms.test": (INAT_TEST, "margin_ap/config/transform/cub.yaml"),
    },
    "roadmap_inaturalist": {
        "data.sampler": ("m_per_class", R + "dataset/inaturalist.yaml"),
        "data.batch_size": (384, "README: batch_size=384"),
        "model.layer_norm": (False, R + "model/resnet.yaml"),
        "resolved.optimizers.backbone.lr": (1e-5, "docs/definitions.md, 'Official training recipes' (optimizer/inaturalist.yaml)"),
        "resolved.optimizers.head.lr": (2e-5, "docs/definitions.md, 'Official training recipes' (optimizer/inaturalist.yaml)"),
        "resolved.optimizers.head.weight_decay": (4e-4, "docs/definitions.md, 'Official training recipes' (optimizer/inaturalist.yaml)"),
        "resolved.optimizers.head.milestones": ([30, 70], "docs/definitions.md, 'Official training recipes'"),
        "loss.kwargs.start": (0.0, R + "loss/roadmap_inat.yaml"),
        "loss.kwargs.offset": (1.0, R + "loss/roadmap_inat.yaml"),
        "train.epochs": (90, "README: experience.max_iter=90"),
        "transforms.train": (INAT_TRAIN, "docs/definitions.md, 'Official training recipes' (transform/inaturalist.yaml)"),
        "transforms.test": (INAT_TEST, "docs/definitions.md, 'Official training recipes' (transform/inaturalist.yaml)"),
    },
    "roadmap_sfm120k": {
        "seed": (333, "derived: experience.seed ???, 333 in every ROADMAP README command"),
        "data.dataset": ("sfm120k", R + "dataset/sfm120k.yaml: SfM120kDataset"),
        "data.sampler": ("m_per_class", R + "dataset/sfm120k.yaml: MPerClassSampler"),
        "data.batch_size": (128, R + "dataset/sfm120k.yaml"),
        "data.samples_per_class": (4, R + "dataset/sfm120k.yaml"),
        "data.eval_batch_size": (96, R + "experience/landmarks.yaml: eval_bs"),
        "data.num_workers": (16, R + "experience/landmarks.yaml"),
        "model.backbone": ("resnet50", R + "model/resnet.yaml (default group)"),
        "model.layer_norm": (False, R + "model/resnet.yaml: norm_features False"),
        "model.embedding_size": (512, R + "model/resnet.yaml"),
        "loss.name": ("ROADMAP", R + "loss/roadmap.yaml (default group)"),
        "loss.kwargs.offset": (1.44, R + "loss/roadmap.yaml"),
        "resolved.optimizers.backbone.lr": (1e-5, "docs/definitions.md, 'Official training recipes' (optimizer/sop.yaml, default group)"),
        "resolved.optimizers.head.lr": (2e-5, "docs/definitions.md, 'Official training recipes' (optimizer/sop.yaml, default group)"),
        "train.epochs": (50, R + "experience/landmarks.yaml: max_iter 50"),
        "train.warmup_epochs": (0, R + "experience/landmarks.yaml: warm_up -1"),
        "train.whitening.learn": (False, "roadmap/engine/landmark_evaluation.py: no whitening"),
        "transforms.train": ([("RandomResizedCrop", [224, 224]), ("RandomHorizontalFlip", None)],
                             R + "transform/sfm120k.yaml"),
        "transforms.test": ([("Resize", [224, 224])], R + "transform/sfm120k.yaml"),
        "eval.every": (5, R + "experience/landmarks.yaml: test_eval_freq 5"),
        "eval.scales": (None, "roadmap/engine/landmark_evaluation.py: one scale"),
        "eval.query_expansion": (None, "roadmap/engine/landmark_evaluation.py"),
    },
    "happier_gldv2_hier": {
        "seed": (0, S + "default.yaml"),
        "data.dataset": ("gldv2_hier", S + "dataset/gldv2_hier.yaml: load_hierarchy, remove_nan"),
        "data.sampler": ("m_per_class", S + "dataset/gldv2_hier.yaml: MPerClassSampler"),
        "data.batch_size": (256, S + "dataset/gldv2_hier.yaml"),
        "data.samples_per_class": (4, S + "dataset/gldv2_hier.yaml"),
        "data.max_per_class": (8, S + "dataset/gldv2_hier.yaml: reduce_per_class 8"),
        "data.eval_batch_size": (60, S + "evaluation/landmark_evaluation.yaml: batch_size 60"),
        "data.num_workers": (10, S + "default.yaml"),
        "model.backbone": ("resnet101", S + "model/resnet_101_LM.yaml"),
        "model.pooling": ("gem", S + "model/resnet_101_LM.yaml: pooling gem (learnable p)"),
        "model.gem_p": (3.0, "suprank/models/get_pooling.py: GeM p=3"),
        "model.layer_norm": (False, S + "model/resnet_101_LM.yaml: norm_features False"),
        "model.embedding_size": (2048, S + "model/resnet_101_LM.yaml: embed_dim"),
        "model.freeze_batchnorm": (True, S + "model/resnet_101_LM.yaml"),
        "loss.name": ("HAPPIER", S + "loss/HAPPIER_pp_LM.yaml: SupHAPLoss + ClusterLoss"),
        "loss.kwargs.lambda_": (0.1, S + "loss/HAPPIER_pp_LM.yaml: weight [0.9, 0.1]"),
        "loss.kwargs.tau": (0.01, S + "loss/HAPPIER_pp_LM.yaml"),
        "loss.kwargs.rho": (100.0, S + "loss/HAPPIER_pp_LM.yaml"),
        "loss.kwargs.delta": (0.05, S + "loss/HAPPIER_pp_LM.yaml"),
        "loss.kwargs.start": (0.5, S + "loss/HAPPIER_pp_LM.yaml"),
        "loss.kwargs.offset": (1.44, S + "loss/HAPPIER_pp_LM.yaml"),
        "loss.kwargs.relevance": ("pop", S + "dataset/gldv2_hier.yaml: relevance_type pop"),
        "loss.kwargs.alpha": (1.0, S + "dataset/gldv2_hier.yaml: alpha 1.0"),
        "resolved.optimizers.backbone.optimizer": ("adam", S + "optimizer/gldv2.yaml"),
        "resolved.optimizers.backbone.lr": (1e-4, S + "optimizer/gldv2.yaml"),
        "resolved.optimizers.backbone.weight_decay": (1e-4, S + "optimizer/gldv2.yaml"),
        "resolved.optimizers.backbone.scheduler": ("cosine", S + "optimizer/gldv2.yaml: T_max ${max_iter}"),
        "resolved.optimizers.backbone.eta_min": (0.0, S + "optimizer/gldv2.yaml"),
        "resolved.optimizers.head.lr": (1e-4, S + "optimizer/gldv2.yaml: ${mult:1,...backbone.lr}"),
        "resolved.optimizers.head.weight_decay": (1e-4, S + "optimizer/gldv2.yaml"),
        "resolved.optimizers.loss.optimizer": ("adam", S + "loss/HAPPIER_pp_LM.yaml: ${optimizer.opt.head}"),
        "resolved.optimizers.loss.lr": (1e-4, S + "loss/HAPPIER_pp_LM.yaml: ${optimizer.opt.head}"),
        "resolved.optimizers.loss.scheduler": ("cosine", S + "loss/HAPPIER_pp_LM.yaml: ${optimizer.sch.head}"),
        "train.epochs": (100, S + "default.yaml: max_iter 100"),
        "train.warmup_epochs": (0, S + "default.yaml: warmup_step null"),
        "train.amp": ("fp16", S + "model/resnet_101_LM.yaml: with_autocast True"),
        "optim.grad_clip": (None, S + "default.yaml: gradient_clipping_norm null"),
        "train.memory.size": (0, S + "default.yaml: memory no_memory"),
        "transforms.train": ([("RandomResizedCrop", [224, 224]), ("RandomHorizontalFlip", None)],
                             S + "dataset/gldv2_hier.yaml"),
        "transforms.test": ([("Resize", [224, 224])], S + "dataset/gldv2_hier.yaml"),
        "eval.every": (20, S + "default.yaml: test_eval_freq 20"),
        "eval.scales": (None, S + "evaluation/landmark_evaluation.yaml: multi_scale False"),
        "eval.query_expansion": (None, "suprank/engine/landmark_evaluation.py"),
    },
    "listwise_ap_sfm120k": {
        "model.backbone": ("resnet101", N + "README: Resnet101-AP-GeM"),
        "model.pretrained": ("required", N + "README: fine-tuned from ImageNet"),
        "model.pooling": ("gem", N + "README: GeM"),
        "model.gem_p": (3.0, N + "dirtorch/test_dir.py: --gemp 3"),
        "loss.name": ("ListwiseAP", N + "dirtorch/loss.py: APLoss"),
        "loss.kwargs.num_bins": (25, N + "dirtorch/loss.py: nq=25"),
        "loss.kwargs.sim_range": ([0.0, 1.0], N + "dirtorch/loss.py: min=0, max=1"),
        "train.whitening.learn": (True, N + "README: whitening learned on the training set"),
        "train.whitening.power": (0.25, N + "dirtorch/test_dir.py: --whitenp 0.25"),
        "train.whitening.dim": (None, N + "dirtorch/test_dir.py: --whitenv None"),
        "transforms.test": ([], N + "dirtorch/test_dir.py: --trfs '' (native size, one resolution)"),
        "data.eval_batch_size": (1, N + "dirtorch/test_dir.py: batch_size 1 unless same_size"),
        "eval.scales": (None, N + "dirtorch/test_dir.py: single resolution"),
        "eval.query_expansion": (None, N + "dirtorch/test_dir.py: --aqe None"),
        "reported.roxford5k/mAP@medium": (67.1, N + "README: Resnet101-AP-GeM"),
        "reported.roxford5k/mAP@hard": (42.3, N + "README"),
        "reported.rparis6k/mAP@medium": (80.3, N + "README"),
        "reported.rparis6k/mAP@hard": (60.9, N + "README"),
    },
}


def lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def transform_steps(described: list[dict]) -> list:
    """The augmentation / resizing steps (not the dtype conversions) as (name, size) pairs."""
    keep = ("Resize", "RandomResizedCrop", "CenterCrop", "RandomHorizontalFlip")
    return [(s["name"], s.get("size")) for s in described if s["name"] in keep]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_the_resolved_recipe_equals_the_official_files(name):
    shown = resolved_recipe(load_recipe(name))
    shown["transforms"] = {k: transform_steps(v) for k, v in shown["resolved"]["transforms"].items()}
    mismatches = []
    for key, (value, source) in OFFICIAL[name].items():
        got = lookup(shown, key)
        if key.startswith("transforms."):
            value = [tuple(v) for v in value]
        if got != value and not (isinstance(value, float) and got == pytest.approx(value)):
            mismatches.append(f"{key}: recipe {got!r}, official {value!r} ({source})")
    assert not mismatches, "\n".join(mismatches)


def synthetic_labels(cfg, n_super=12, fine_per_super=40, images=6):
    """Labels shaped like the recipe's dataset: enough classes and levels for its sampler."""
    levels = {"sop": 2, "inaturalist": 2, "inaturalist_full": 7, "cub": 1, "sfm120k": 1}.get(cfg.data.dataset, 3)
    # enough fine classes for one batch of the m-per-class sampler (listwise AP takes 1,024 of them)
    fine_per_super = max(fine_per_super, -(-cfg.data.batch_size // cfg.data.samples_per_class // n_super))
    fine = np.repeat(np.arange(n_super * fine_per_super), images)
    cols = [fine] + [fine // (fine_per_super * (2**c)) for c in range(levels - 1)]
    return np.stack(cols[:levels], 1)


def built_objects(name):
    cfg = load_recipe(name, overrides=["model.pretrained=false"])
    if cfg.model.backbone == "deit_small_distilled":
        pytest.importorskip("timm")
    labels = synthetic_labels(cfg)
    model = build_model(cfg.model)
    loss = build_loss(cfg, labels, embedding_size=model.embedding_size)
    groups = parameter_groups(cfg, model, loss)
    optimizers, schedulers = build_optimizers(cfg.optim, groups, cfg.train.epochs)
    return cfg, labels, model, loss, groups, optimizers, schedulers


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_the_engine_builds_the_official_optimisers_and_schedules(name):
    cfg, labels, model, loss, groups, optimizers, schedulers = built_objects(name)
    shown = resolved_recipe(cfg)["resolved"]["optimizers"]
    assert set(optimizers) == {g for g, p in groups.items() if p} == set(shown) - ({"loss"} - set(groups) if not list(loss.parameters()) else set())
    covered = [id(p) for o in optimizers.values() for pg in o.param_groups for p in pg["params"]]
    assert len(covered) == len(set(covered))  # no parameter in two optimisers
    assert set(covered) == {id(p) for p in model.parameters()} | {id(p) for p in loss.parameters()}
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    for group, opt in optimizers.items():
        want = shown[group]
        assert type(opt) is kinds[want["optimizer"]], group
        (pg,) = opt.param_groups
        assert pg["lr"] == pytest.approx(want["lr"]) and pg["weight_decay"] == pytest.approx(want["weight_decay"])
        if want["optimizer"] == "sgd":
            assert pg["momentum"] == want["momentum"] and pg["nesterov"] == want["nesterov"]
        sched = schedulers[group]
        if want["scheduler"] == "cosine":
            assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
            assert sched.T_max == cfg.train.epochs and sched.eta_min == pytest.approx(want["eta_min"])
        elif want["scheduler"] == "multistep":
            assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR)
            assert sorted(sched.milestones) == want["milestones"] and sched.gamma == want["gamma"]
        else:
            assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_the_engine_builds_the_official_sampler_and_transforms(name):
    from hapkit.data import HierarchicalBatchSampler, MPerClassBatchSampler
    from hapkit.data.builder import recipe_transform
    from hapkit.data.transforms import describe_transforms

    cfg = load_recipe(name)
    labels = synthetic_labels(cfg)
    if cfg.data.sampler == "hierarchical":
        labels = synthetic_labels(cfg, n_super=12, fine_per_super=80)
    sampler = build_sampler(cfg, labels)
    first = next(iter(sampler))
    assert len(first) == cfg.data.batch_size
    if cfg.data.sampler == "hierarchical":
        assert isinstance(sampler, HierarchicalBatchSampler)
        supers = labels[:, cfg.data.sampler_column]
        assert len(set(supers[first].tolist())) == cfg.data.super_classes_per_batch
        n_super = len(set(supers.tolist()))
        pairs = n_super * (n_super - 1) // 2
        assert sampler.batches_per_epoch == pairs * cfg.data.batches_per_super_tuple  # SOP: 66 x 5 or 66 x 10
    else:
        assert isinstance(sampler, MPerClassBatchSampler) and sampler.fill == "passes"
        counts = np.unique(labels[first, 0], return_counts=True)[1]
        assert set(counts.tolist()) == {cfg.data.samples_per_class}
    for train in (True, False):
        steps = transform_steps(describe_transforms(recipe_transform(cfg.data, train)))
        assert steps == transform_steps(resolved_recipe(cfg)["resolved"]["transforms"]["train" if train else "test"])


def test_a_sampler_the_dataset_cannot_serve_fails_before_training():
    """HAPPIER's SOP sampler asks 32 fine classes of each of its 2 super-classes per batch."""
    from hapkit.training.engine import Trainer

    from test_training_engine import TinySet

    cfg = load_recipe("happier_generated", overrides=["data.batch_size=256", "data.sampler_column=1",
                                                      "model.width=4", "train.device=cpu"])
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, out_dir=None, train_set=TinySet(), progress=False)
    message = str(info.value)
    assert "super-class" in message and "needs 32" in message and "data.batch_size" in message


def test_official_recipes_say_where_they_come_from():
    from hapkit.training.recipes import recipe_path

    for name in OFFICIAL:
        header = recipe_path(name).read_text().split("\n\n")[0]
        assert ("Resolved from elias-ramzi/" in header or "Resolved from naver/" in header) and "README" in header, name

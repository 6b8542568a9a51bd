"""The study's config: which models, each stage's settings, and the paper's own (PAPER), shown beside
the run's in the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from ..config import PAPER_PGD, PGDSettings, build_dataclass, read_yaml
from ..errors import check
from ..inception import PREPROCESSING
from ..visualize import FEATURE_VIS, GENERATION, INVERSION

# The paper's settings (section 3 and the authors' code) that both of its datasets share; each
# dataset's own follow in PAPER.
COMMON_SETTINGS = {
    "initial weights": "random",
    "epochs": 100,
    "gradient clipping": "+-0.1 per value",  # the authors' trainers (clip_grad_value_)
    "batch norm over": "the whole batch",  # one GPU: 128 / 200 images, in training and in the training attack
    "AutoAttack images": 0,
    "explained images": 24,
    "explained class": "predicted",
    "IG baselines x steps": "10 x 50",
    "SHAP samples, background": "200, 176",
    "SHAP background from": "test",  # the explained images' shuffled test batch (the authors' notebooks)
    "class seeds pooled by": 4,
    "inversion PGD": INVERSION.describe(),
    "inversion runs": 2,
    "feature visualisation PGD": FEATURE_VIS.describe(),
}
# CIFAR-10's adversarial training and evaluation PGD, and Small ImageNet's (Tables 1 and 4).
CIFAR_PGD = PAPER_PGD.describe()
FOLDER128_PGD = PGDSettings(eps=1.5, step_size=2.5 * 1.5 / 20, steps=20).describe()

# The paper's figures, shown beside ours in the report (Tables 1-6); where each of its tables and figures
# lands in our report (`numbers`); and its settings (`settings`), which the report compares with the
# run's own ("How this run differs from the paper").
PAPER = {
    "cifar10": {
        "accuracy": {"standard": (93.2, 0.36), "robust": (85.0, 64.6)},  # clean, PGD-20 L2 eps 0.5 (%)
        "fid": {"real": 5.39, "standard": 152.29, "robust": 88.25},
        "inception192": {"standard": 30.1, "robust": 20.05},  # Inv. 1 (Fig. 4)
        "inception192_inv2": {"standard": 30.07, "robust": 21.18},  # Inv. 2 (Fig. 11)
        "numbers": {
            "accuracy": "Table 1",
            "fid": "Table 2",
            "inversion": "Table 3",
            "overlays": "Fig. 2",
            "ig_grid": "Fig. 10",
            "shap_grid": "Fig. 13",
            "classes": "Fig. 3",
            "seeds": "Fig. 14",
            "inv1": "Fig. 4",
            "inv2": "Fig. 11",
            "features": "Figs. 5 / 12",
        },
        "settings": {
            **COMMON_SETTINGS,
            "architecture": "cifar_resnet18",
            "training images": 50_000,
            "validation images per epoch": "none: the author chose the epoch on the 10000 test images",
            "batch size": 128,
            "robust training PGD": CIFAR_PGD,
            "test images (clean, PGD)": 10_000,
            "evaluation PGD": CIFAR_PGD,
            "generated images a class": 1000,
            "generation PGD": GENERATION[32].describe(),
            "real-data FID images (train vs test)": "10000 vs 10000",
            "generated-image FID images (generated vs test)": "10000 vs 10000",
        },
    },
    "folder128": {
        "accuracy": {"standard": (70.1, 0.88), "robust": (55.8, 35.4)},  # PGD-20 L2 eps 1.5
        "fid": {"real": 7.62, "standard": 237.53, "robust": 81.2},
        "inception192": {"standard": 23.3, "robust": 12.84},  # Inv. 1 (Fig. 8)
        "inception192_inv2": {"standard": 26.75, "robust": 14.91},  # Inv. 2 (Fig. 18)
        "numbers": {
            "accuracy": "Table 4",
            "fid": "Table 5",
            "inversion": "Table 6",
            "overlays": "Fig. 6",
            "ig_grid": "Fig. 16",
            "shap_grid": "Fig. 17",
            "classes": "Fig. 7",
            "seeds": "Fig. 19",
            "inv1": "Fig. 8",
            "inv2": "Fig. 18",
            "features": "Figs. 9 / 15",
        },
        "settings": {
            **COMMON_SETTINGS,
            "architecture": "resnet50",
            "training images": 90_000,
            "validation images per epoch": "none: the author chose the epoch on the 7500 test images",
            "batch size": 200,
            "robust training PGD": FOLDER128_PGD,
            "test images (clean, PGD)": "7500 (val) and ImageNetV2",
            "evaluation PGD": FOLDER128_PGD,
            "generated images a class": 60,
            "generation PGD": GENERATION[128].describe(),
            "real-data FID images (train vs test)": "9000 vs 9000",
            "generated-image FID images (generated vs test)": "9000 vs 9000",
        },
    },
}


@dataclass(frozen=True)
class ModelSource:
    """A model: trained here from a training config (`train`, a YAML path), or taken as it is from a
    robint checkpoint folder (`checkpoint`)."""

    train: str | None = None
    checkpoint: str | None = None
    set: tuple[str, ...] = ()  # overrides of the training config, as `robint train --set`: ["epochs=20"]


# Where the PGD budget of a stage lived before it became the stage's `pgd` mapping.
BUDGET_MOVED = {key: f"pgd.{key}" for key in ("eps", "step_size", "steps", "norm")}


@dataclass(frozen=True)
class EvalStage:
    """The PGD of Tables 1 / 4 (its budget, `pgd`) on n test images, and AutoAttack beside it (the same
    norm and eps) on autoattack_n: seeded draws spread over the classes (`data.draw`)."""

    pgd: PGDSettings = PAPER_PGD
    n: int | None = None  # test images (None: all)
    autoattack_n: int = 100  # AutoAttack is slow: this many test images (0: skip)
    autoattack_version: str = "standard"  # or "custom" with autoattack_attacks, e.g. [apgd-ce, apgd-t]
    autoattack_attacks: tuple[str, ...] = ()
    batch_size: int = 128

    MOVED: ClassVar[dict[str, str]] = BUDGET_MOVED


@dataclass(frozen=True)
class AttributionStage:
    n: int = 24  # the paper's grids hold 24 images
    overlays: int = 3  # images in the overlay figure (Figs. 2, 6)
    ig_steps: int = 50
    ig_baselines: int = 10
    shap_nsamples: int = 200
    shap_background: int = 176
    target: str = "predicted"  # explain each model's own argmax (the authors'), or "label"
    # SHAP's background: "test", the authors' (the shap_background images after the explained ones in
    # one seeded draw of test images spread over the classes), or "train" (a seeded draw of the train split)
    background: Literal["test", "train"] = "test"

    def __post_init__(self):
        check(
            self.background in ("test", "train"),
            f"attributions.background must be test or train, got {self.background!r}",
        )


@dataclass(frozen=True)
class GenerationStage:
    per_class: int = 1000
    pgd: PGDSettings | None = None  # None: the paper's for the model's input size (visualize.GENERATION)
    shard_size: int = 100
    fid_dims: int = 2048
    # Training images per class in the real-data FID (train vs test), drawn seeded (the authors: 1,000
    # a class, 10,000 against CIFAR-10's 10,000 test images); a class with fewer gives all it has.
    # None: every training image.
    real_per_class: int | None = 1000
    seed_pool: int | None = None  # class seeds pooled by this (None: 4, the authors'; 16 at 128 px: robustness's)
    # The Inception's input, for FID and for the inversion stage's Inception-192 distance: "robint", or
    # "author" (truncated uint8 images resized on uint8, as the author's FID and Inception-192 cells).
    fid_preprocess: str = "robint"
    # The FID's spread: also the FID of this many disjoint draws of each model's generations (each
    # per_class / fid_draws images of every class; shard_size must divide that); 0: none.
    fid_draws: int = 0

    MOVED: ClassVar[dict[str, str]] = BUDGET_MOVED

    def __post_init__(self):
        check(
            self.fid_preprocess in PREPROCESSING,
            f"generation.fid_preprocess must be one of {', '.join(PREPROCESSING)}, got {self.fid_preprocess!r}",
        )


@dataclass(frozen=True)
class InversionStage:
    """The authors' protocol: each run inverts one test image from `image_sources` test images of
    other classes and `noise` grey-noise images (0.5 + U/20); run 1 is the paper's Inv. 1 (Figs. 4 / 8),
    run 2 its Inv. 2 (Figs. 11 / 18), each with its own draw. The PGD budget `pgd`: the paper's,
    visualize.INVERSION."""

    pgd: PGDSettings = INVERSION
    runs: int = 2
    image_sources: int = 2
    noise: int = 1

    MOVED: ClassVar[dict[str, str]] = BUDGET_MOVED


@dataclass(frozen=True)
class FeatureStage:
    """Feature visualisation from `starts` uniform-noise images, with the `top` test images that
    activate each feature most and least. The PGD budget `pgd`: the paper's, visualize.FEATURE_VIS."""

    pgd: PGDSettings = FEATURE_VIS
    features: tuple[tuple[int, ...], ...] = ((130,), (492,))  # the paper's Figs. 5 and 9
    starts: int = 4
    top: int = 8

    MOVED: ClassVar[dict[str, str]] = BUDGET_MOVED


# How many Ray tasks of each stage share one GPU by default (gpus_per_task None, a cluster with GPUs):
# evaluation, attributions and generation + FID run batches of 100 or more images (IG: 50 steps x 10
# baselines per image) and keep a GPU busy alone; inversion and feature visualisation run one image per
# task through 400-10,000 sequential steps, too small to fill a GPU, so four share one.
TASKS_PER_GPU = {"evaluation": 1, "attributions": 1, "generation": 1, "inversion": 4, "features": 4}


@dataclass(frozen=True)
class StudyConfig:
    name: str = "CIFAR-10"
    paper: str = "cifar10"  # which of the paper's tables to show beside ours: cifar10 or folder128
    data: str = "sample"
    workers: int = 2  # Ray workers for training; tasks at a time for the fan-outs
    gpus_per_worker: float = 0
    # GPUs / CPUs per Ray task of the evaluation, attribution, generation + FID, inversion and feature
    # stages (fractions allowed); gpus_per_task None: on a cluster with GPUs, TASKS_PER_GPU's share of
    # one per stage, else 0.
    gpus_per_task: float | None = None
    cpus_per_task: float = 1
    seed: int = 0
    standard: ModelSource = field(default_factory=ModelSource)
    robust: ModelSource = field(default_factory=ModelSource)
    evaluation: EvalStage = field(default_factory=EvalStage)
    attributions: AttributionStage = field(default_factory=AttributionStage)
    generation: GenerationStage = field(default_factory=GenerationStage)
    inversion: InversionStage = field(default_factory=InversionStage)
    features: FeatureStage = field(default_factory=FeatureStage)

    def __post_init__(self):
        check(self.paper in PAPER, f"paper must be one of {', '.join(PAPER)}, got {self.paper!r}")
        check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        check(
            self.gpus_per_task is None or self.gpus_per_task >= 0,
            f"gpus_per_task must be >= 0, got {self.gpus_per_task}",
        )
        check(self.cpus_per_task > 0, f"cpus_per_task must be > 0, got {self.cpus_per_task}")
        for name in ("standard", "robust"):
            source = getattr(self, name)
            check(
                (source.train is None) != (source.checkpoint is None),
                f"{name}: give exactly one of train (a training config) or checkpoint (a folder)",
            )


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    data = read_yaml(path, "study config")
    base = path.parent
    for name in ("standard", "robust"):  # paths in the file are relative to the file
        for key in ("train", "checkpoint"):
            value = (data.get(name) or {}).get(key)
            if value is not None and not Path(value).is_absolute() and (base / value).exists():
                data[name][key] = str((base / value).resolve())
    if (
        data.get("data") not in (None, "sample")
        and not Path(data["data"]).is_absolute()
        and (base / data["data"]).exists()
    ):
        data["data"] = str((base / data["data"]).resolve())
    return build_dataclass(StudyConfig, data, f"{path}: ")

"""The paper end to end as one job: train, evaluate, explain, generate + FID, invert, visualise, report.

    robint study experiments/paper/cifar10.yaml --out runs/paper-cifar10
    ray job submit --working-dir . -- robint study experiments/paper/cifar10.yaml --out s3://bucket/paper

OUT is a local path or a storage URI (storage.Location); on a cluster every node must be able to write
and read it (an s3:// URI or a shared mount), which cluster.storage_preflight checks before any work. Stages
run in order; each writes OUT/<stage>/result.json when it has finished, and a rerun skips every
stage whose result exists (and, inside generation, every shard already written), so a job that failed
or was killed resumes where it stopped. The last stage writes OUT/report.html (figures embedded) and
OUT/report.json (every number, the settings, the code version, the hardware, each stage's time).

Layout: `config` (the study's YAML and the paper's own settings), `core` (`Study`: runs each stage
once), one module a stage with its run() and the report sections that show it (`training`,
`evaluation`, `attributions`, `generation`, `inversion`, `features`), and `report` (the sections
common to the whole run).
"""

from .config import (
    PAPER,
    TASKS_PER_GPU,
    AttributionStage,
    EvalStage,
    FeatureStage,
    GenerationStage,
    InversionStage,
    ModelSource,
    StudyConfig,
    load_study,
)
from .core import STAGES, Study
from .report import run_settings

__all__ = [
    "PAPER",
    "STAGES",
    "TASKS_PER_GPU",
    "AttributionStage",
    "EvalStage",
    "FeatureStage",
    "GenerationStage",
    "InversionStage",
    "ModelSource",
    "Study",
    "StudyConfig",
    "load_study",
    "run_settings",
]

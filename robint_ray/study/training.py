"""Stage 1: the standard and the robust model (trained here on Ray Train, or taken from a checkpoint),
and the report's training curves."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..report import Section, Table, training_curves_png
from ..storage import Location
from ..train import RAY_NAME
from ..train import run as train_run
from .report import portable

if TYPE_CHECKING:
    from .core import Study

NAME = "train"
MODELS = ("standard", "robust")


def run(study: Study, folder: Location) -> dict[str, Any]:
    """Per model: {"checkpoint"} for a model given as a checkpoint, else {"checkpoint" (the best epoch),
    "config", "epochs" (the per-epoch metrics)}. A model whose run folder has no `done` mark is
    trained, resuming Ray Train's own checkpoints when a killed run left them."""
    out = {}
    for name in MODELS:
        source = getattr(study.config, name)
        if source.checkpoint is not None:
            out[name] = {"checkpoint": source.checkpoint}
            continue
        run_dir = folder / name
        if not (run_dir / "done").exists():
            resume = (run_dir / "ray" / RAY_NAME).exists()
            config = study.config
            train_run(
                study.train_config(name),
                run_dir,
                workers=config.workers,
                gpus_per_worker=config.gpus_per_worker,
                resume=resume,
                wait_s=study.wait_s,
            )
            # The best checkpoint's copy of its training config, without the running machine's paths
            # (the data, the initial weights: relative to OUT), as every result of the study.
            meta = run_dir / "best" / "meta.json"
            meta.write_text(json.dumps(portable(json.loads(meta.read_text()), study.out), indent=2))
            (run_dir / "done").write_text("")
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        out[name] = {"checkpoint": (run_dir / "best").uri, "config": source.train, "epochs": metrics}
    return out


def sections(study: Study, results: dict[str, Any], paper: dict[str, Any]) -> list[Section]:
    """The training curves, as a table and a figure (none for models given as checkpoints)."""
    histories = {name: results[NAME][name]["epochs"] for name in MODELS if results[NAME][name].get("epochs")}
    columns = ("epoch", "train_loss", "train_accuracy", "val_clean_accuracy", "val_adversarial_accuracy")
    rows = [[name, *(row.get(key) for key in columns)] for name in histories for row in histories[name]]
    figures = []
    if histories:
        curves = (study.out / "report_training_curves.png").write_bytes(training_curves_png(histories))
        figures.append(("training loss, validation clean and PGD accuracy per epoch", curves))
    header = ["model", "epoch", "train loss", "train acc", "val clean", "val PGD"]
    return [
        Section(
            "Training",
            "Per epoch, on the validation split carved out of the training set; "
            "the best epoch is kept: by clean validation accuracy for the standard model and by "
            "mean(clean, PGD) for the robust one, as the authors' two trainers select.",
            [Table("Training curves", header, rows)] if rows else [],
            figures,
        )
    ]

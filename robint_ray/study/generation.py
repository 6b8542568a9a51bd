"""Stage 4, Tables 2 / 5 and Figs. 3 / 7, 14 / 19: class-specific generation with both models and the
FID of the generated and of real training images against the test split."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import inception
from ..data import load_split
from ..fid import fid_from_stats, open_source, source_stats
from ..generate import (
    FIDFeatures,
    GenerationConfig,
    fit_seeds,
    generate,
    per_class_sample,
    sample_images,
    save_generation_figures,
)
from ..report import Section, Table, difference
from ..storage import Location
from ..visualize import generation_settings

if TYPE_CHECKING:
    from .core import Study

NAME = "generation"
MODELS = ("standard", "robust")


def run(study: Study, folder: Path) -> dict[str, Any]:
    """Per model, class generation and FID as one streamed step: each shard's task writes its
    images to OUT/generation/<model>/shards/ (straight to OUT, which every node sees) and returns
    only their Inception statistics, added up in the driver as they arrive; the figures show the
    first images of each class. The real sets' statistics come from their own fan-out."""
    c, tasks = study.config.generation, study.tasks(NAME)
    extractor = inception.load_fid_inception()
    real = {"test": open_source(study.config.data, "test"), "train": real_images(study)}
    real_stats = source_stats(
        list(real.values()), extractor, dims=c.fid_dims, tasks=tasks, preprocessing=c.fid_preprocess
    )
    stats = dict(zip(real, real_stats))
    features = FIDFeatures(extractor, dims=c.fid_dims, preprocessing=c.fid_preprocess)
    test = study.test_split()
    out: dict[str, Any] = {}
    draw_stats: dict[str, list] = {}
    for name in MODELS:
        model = study.model(name)
        settings = c.pgd or generation_settings(model.input_size)
        config = GenerationConfig(
            per_class=c.per_class,
            classes=tuple(range(model.num_classes)),
            seed=study.config.seed,
            shard_size=c.shard_size,
            batch_size=min(c.shard_size, 100),
            settings=settings,
            rounding=inception.ROUNDING[c.fid_preprocess],
        )
        seeds = fit_seeds(test, num_classes=model.num_classes, pool=c.seed_pool)
        shards_at = study.out / NAME / name
        made = generate(
            model,
            seeds,
            config=config,
            out_dir=shards_at,
            tasks=tasks,
            class_names=test.classes,
            fid=features,
            fid_draws=c.fid_draws,
            merge=False,
        )
        stats[name] = made["stats"]
        draw_stats[name] = made.get("draw_stats", [])
        images, labels, starts = sample_images(shards_at, config, per_class=8)
        title = f"{name} model: class-specific generation"
        figures = save_generation_figures(folder / name, images, labels, starts, test.classes, title=title)
        out[name] = {
            "images": made["images"],
            "shards": str(shards_at / "shards"),
            "settings": asdict(settings),
            "seed_pool": seeds.pool,
            "seed_dims": int(seeds.mean.shape[1]),
            "figures": [str(p) for p in figures],
        }
    out["fid"] = {
        "real (train vs test)": fid_from_stats(stats["train"], stats["test"]),
        **{name: fid_from_stats(stats[name], stats["test"]) for name in MODELS},
    }
    out["n"] = {n: s.n for n, s in stats.items()}
    if c.fid_draws:
        out["fid_draws"] = fid_spread({name: draw_stats[name] for name in MODELS}, stats["test"])
    out["real_per_class"] = c.real_per_class
    out["dims"], out["weights_sha256"] = c.fid_dims, extractor.weights_info.get("sha256")
    out["preprocessing"], out["resize"] = c.fid_preprocess, inception.PREPROCESSING[c.fid_preprocess]
    return out


def fid_spread(draws: dict[str, list], test) -> dict[str, Any]:
    """Each model's FID on each disjoint draw of its generations (against the same test statistics), and
    robust - standard per draw with its mean, standard deviation and range: how far the comparison moves
    between sets of generations. A draw holds fewer images than the whole set, so its FIDs sit higher
    than the whole set's (FID's small-sample bias); the difference is what the draws are for."""
    fids = {name: [fid_from_stats(s, test) for s in stats] for name, stats in draws.items()}
    diff = np.subtract(fids["robust"], fids["standard"])
    return {
        "images_per_draw": draws["robust"][0].n,
        **fids,
        "robust - standard": {
            "per_draw": diff.tolist(),
            "mean": float(diff.mean()),
            "sd": float(diff.std(ddof=1)) if len(diff) > 1 else None,
            "min": float(diff.min()),
            "max": float(diff.max()),
        },
    }


def real_images(study: Study):
    """The real-data FID's training images: generation.real_per_class of each class (seeded; fewer
    where a class has fewer), or the whole training split. A selection of the split by position,
    not a file: each FID task reads its own images from the dataset, which every node has (a file
    in this stage's folder would be on the driver's disk alone until the stage ends)."""
    c, data = study.config.generation, study.config.data
    train = open_source(data, "train")
    if c.real_per_class is None:
        return train
    labels = load_split(data, "train").labels
    return train.select(per_class_sample(labels, c.real_per_class, seed=study.config.seed))


def sections(study: Study, results: dict[str, Any], paper: dict[str, Any]) -> list[Section]:
    """The FID table beside the paper's, the generated classes and their seeds."""
    g, number = results[NAME], paper["numbers"]
    fid, n = g["fid"], g["n"]
    rows = [["real data (train vs test)", fid["real (train vs test)"], paper["fid"]["real"], n["train"]]]
    rows += [[f"{name} model", fid[name], paper["fid"][name], n[name]] for name in MODELS]
    rows = [[label, ours, theirs, difference(ours, theirs), count] for label, ours, theirs, count in rows]
    figures = [
        (f"{number[kind]}: {name} model: {what}", Location(path))
        for name in MODELS
        for kind, what, path in zip(("classes", "seeds"), ("generated classes", "their seeds"), g[name]["figures"])
    ]
    return [
        Section(
            f"Class-specific generation and FID ({number['fid']}, {number['classes']}, {number['seeds']})",
            f"FID ({g['dims']}-d, {g['resize']}) against the {g['n']['test']} test images. With fewer images FID "
            "is biased upward (the paper used 10,000 CIFAR-10 / 9,000 Small ImageNet images): compare the rows "
            "with each other rather than with the paper's figures.",
            [Table("FID (lower is better)", ["images", "FID (ours)", "FID (paper)", "ours - paper", "n"], rows)],
            figures,
        )
    ]

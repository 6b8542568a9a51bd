"""One self-contained HTML report (figures embedded) and a JSON of every number.

The study script fills `Section`s with tables and figures; `write_report` renders them into
`report.html` (no external files, no scripts: it opens offline and in a headless browser) and writes
`report.json` beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .storage import Location


@dataclass
class Table:
    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)  # (caption, PNG path)


def difference(ours: float | None, paper: float | None) -> float | None:
    """ours - paper, the report's column beside the paper's figures (None where either is missing)."""
    return None if ours is None or paper is None else ours - paper


def code_version(root: Path | None = None) -> dict[str, str]:
    """The package version and, inside a git checkout, the commit (with '+dirty' for local changes)."""
    root = root or Path(__file__).resolve().parents[1]
    version = {"package": __version__}
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        version["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        version["git_commit"] = "unknown (not a git checkout)"
    return version


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        import ray

        info["ray"] = ray.__version__
        if ray.is_initialized():
            info["ray_cluster_resources"] = {
                k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")
            }
            info["ray_nodes"] = len([n for n in ray.nodes() if n.get("Alive")])
    except ImportError:
        pass
    return info


def training_curves_png(histories: dict[str, Sequence[dict[str, Any]]]) -> bytes:
    """A PNG of the training curves, one line per model (name -> metrics.jsonl rows): training loss,
    and clean and PGD accuracy on the validation split, per epoch; the kept (best) epoch is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("train_loss", "training loss"),
        ("val_clean_accuracy", "validation clean accuracy"),
        ("val_adversarial_accuracy", "validation PGD accuracy"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        for name, rows in histories.items():
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            (line,) = ax.plot(*zip(*points), marker=".", label=name)
            best = rows[-1].get("best_epoch")
            for epoch, value in points:
                if epoch == best:
                    ax.plot([epoch], [value], "o", mfc="none", ms=10, color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("training curves (circle: the kept epoch)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _figure(caption: str, path: str | Path | Location) -> str:
    data = base64.b64encode(Location(path).read_bytes()).decode()
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
caption { caption-side: top; font-weight: 600; text-align: left; padding-bottom: 0.3em; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; } pre { background: #f6f6f6; padding: 0.7em; overflow-x: auto; }
"""


def write_report(
    out_dir: str | Path | Location, *, title: str, sections: Sequence[Section], data: dict[str, Any]
) -> Location:
    """Write out_dir/report.html and out_dir/report.json (a local folder or a storage URI; figures
    are read from either); returns the HTML's location."""
    out_dir = Location(out_dir)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.extend(f"<p>{html.escape(p)}</p>" for p in section.text.split("\n\n"))
        for table in section.tables:
            parts.append(
                f"<table><caption>{html.escape(table.caption)}</caption><tr>"
                + "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header)
                + "</tr>"
            )
            parts.extend("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in table.rows)
            parts.append("</table>")
        parts.extend(_figure(caption, path) for caption, path in section.figures)
        parts.append("</section>")
    parts.append("</body></html>")
    page = out_dir / "report.html"
    page.write_text("\n".join(parts))
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str))
    return page

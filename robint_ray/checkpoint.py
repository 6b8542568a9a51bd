"""Our checkpoint format, and loading of foreign weight files.

A checkpoint is a folder:
- `model.safetensors`: the model's tensors and nothing else (no pickle, so no code runs on load);
- `meta.json`: `format`, `arch`, `num_classes`, `classes`, `mean`, `std`, `input_size`, `config` (the
  training config, a plain dict), `metrics`, and `sha256` of the tensor file.
That is enough to rebuild the model from the folder alone. Foreign weights (`--arch A --weights W`):
a `.safetensors` file, or a torch file holding a state dict (or `{"state_dict": ...}`, the akamaster
format), read with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, check
from .files import file_hash
from .models import Classifier, build_model, to_our_keys
from .storage import Location, local_input

FORMAT = "robint-checkpoint-1"
WEIGHTS, META = "model.safetensors", "meta.json"


def save_checkpoint(
    directory: str | Path | Location,
    model: Classifier,
    *,
    classes: list[str] | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path | Location:
    """Write model.safetensors and meta.json into `directory`, a local folder or a storage URI
    (created; each file replaced atomically, the weights before the metadata that names their hash)."""
    from safetensors.torch import save

    target = Location(directory)
    if not target.is_local:
        with tempfile.TemporaryDirectory(prefix="robint-ckpt-") as tmp:
            save_checkpoint(tmp, model, classes=classes, config=config, metrics=metrics)
            for name in (WEIGHTS, META):
                (target / name).write_bytes((Path(tmp) / name).read_bytes())
        return target
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    Location(directory / WEIGHTS).write_bytes(save(state))  # atomically: a reader never sees half a file
    meta = {
        "format": FORMAT,
        "arch": model.arch,
        "num_classes": model.num_classes,
        "classes": list(classes) if classes is not None else [str(i) for i in range(model.num_classes)],
        "mean": model.normalize.mean.flatten().tolist(),
        "std": model.normalize.std.flatten().tolist(),
        "input_size": model.input_size,
        "config": config or {},
        "metrics": metrics or {},
        "sha256": file_hash(directory / WEIGHTS),
    }
    Location(directory / META).write_json(meta)
    return directory


def read_meta(directory: str | Path | Location) -> dict[str, Any]:
    """meta.json of a checkpoint folder (a local path or a storage URI)."""
    if not Location(directory).is_local:
        source = Location(directory)
        check(
            (source / META).is_file() and (source / WEIGHTS).is_file(),
            f"{source}: not a robint checkpoint (needs {META} and {WEIGHTS})",
        )
        try:
            meta = (source / META).read_json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{source / META}: corrupt metadata ({err})") from err
        check(meta.get("format") == FORMAT, f"{source / META}: unknown format {meta.get('format')!r}")
        return meta
    directory = Path(directory)
    check(directory.is_dir(), f"checkpoint folder not found: {directory}")
    check(
        (directory / META).is_file() and (directory / WEIGHTS).is_file(),
        f"{directory}: not a robint checkpoint (needs {META} and {WEIGHTS})",
    )
    try:
        meta = json.loads((directory / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{directory / META}: corrupt metadata ({err})") from err
    check(meta.get("format") == FORMAT, f"{directory / META}: unknown format {meta.get('format')!r}")
    return meta


def load_checkpoint(
    directory: str | Path | Location,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model of a checkpoint folder, a local path or a storage URI (`s3://.../best`,
    downloaded to a temporary folder). arch / num_classes, when given, must match it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Location(directory).is_local:
        source = Location(directory)
        check((source / META).is_file(), f"checkpoint not found: {source} (no {META})")
        with source.local_copy() as local:
            return load_checkpoint(local, arch=arch, num_classes=num_classes, device=device)
    directory = Path(directory)
    meta = read_meta(directory)
    check(arch is None or arch == meta["arch"], f"{directory}: checkpoint is a {meta['arch']}, not a {arch}")
    check(
        num_classes is None or num_classes == meta["num_classes"],
        f"{directory}: checkpoint has {meta['num_classes']} classes, not {num_classes}",
    )
    weights = directory / WEIGHTS
    if meta.get("sha256") and file_hash(weights) != meta["sha256"]:
        raise InputError(f"{weights}: corrupt or truncated (sha256 differs from {META})")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{weights}: corrupt or truncated checkpoint ({err})") from err
    model = build_model(meta["arch"], meta["num_classes"])
    _load_state(model, state, str(weights))
    return model.to(device).eval(), meta


def load_weights(
    arch: str, path: str | Path, *, num_classes: int | None = None, device: str | torch.device = "cpu"
) -> Classifier:
    """A model of architecture `arch` with the weights of a foreign file (see module docstring), a
    local path or a storage URI (`storage.local_input`)."""
    path = local_input(path)
    check(path.is_file(), f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InputError(f"{path}: corrupt or truncated weights file ({err})") from err
    else:
        state = _torch_load_safely(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        check(
            isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
            f"{path}: not a state dict of tensors",
        )
    heads = [v for k, v in state.items() if k.endswith(("linear.weight", "fc.weight", "head.weight"))]
    if num_classes is None and len(heads) == 1:
        num_classes = heads[0].shape[0]
    model = build_model(arch, num_classes)
    _load_state(model, to_our_keys(model, state), str(path))
    return model.to(device).eval()


def initial_weights(source: str | Path, *, arch: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The state dict that a training run's `init` names, checked against the run's architecture and
    classes: a robint checkpoint folder, or a weights file as `load_weights` reads it; a local path or a
    storage URI. Any problem is one InputError naming the source."""
    location = Location(source)
    if (location / META).is_file():
        model, _ = load_checkpoint(source, arch=arch, num_classes=num_classes)
        return model.state_dict()
    check(location.is_file(), f"init weights not found: {source} (neither a robint checkpoint nor a weights file)")
    with location.local_copy() as local:
        return load_weights(arch, local, num_classes=num_classes).state_dict()


def _torch_load_safely(path: Path) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only: no pickled code runs); a file
    it refuses or cannot read is an InputError of one line that names the file and why."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only=True met something that is not a tensor or container
        raise InputError(
            f"{path}: not a weights file torch can load safely (weights_only=True refused it: {_torch_reason(err)})"
        ) from err
    except Exception as err:  # torch raises many types for a bad file: all mean "cannot read it"
        raise InputError(
            f"{path}: corrupt, truncated or not a weights file ({type(err).__name__}: {_torch_reason(err)})"
        ) from err


def _torch_reason(err: BaseException) -> str:
    """The reason inside torch.load's multi-line error text, as one line: its first sentence, or where
    weights_only=True refused the file the first sentence after "WeightsUnpickler error:" (the advice
    around it, to load the file with weights_only=False, is only for files one trusts)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch bolds part of its advice with terminal escapes
    _, marker, after = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (after if marker else text).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def _load_state(model: Classifier, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    # Older torch versions saved no batch-norm step counters; they play no part in eval mode.
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})")
        raise InputError(
            f"{source} does not fit architecture {model.arch} with {model.num_classes} classes; " + "; ".join(parts)
        )
    model.load_state_dict(state)

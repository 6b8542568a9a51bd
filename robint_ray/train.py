"""Standard and PGD adversarial training, data-parallel on Ray Train (paper, Algorithm 1 and section 3).

Three layers:
- `train_epoch`: one pass over a loader; for adversarial training each batch is first replaced by its
  PGD images, computed on the *unwrapped* module (so DistributedDataParallel does not broadcast
  buffers at every PGD step), then one forward/backward of the (DDP) model on them. The same function
  serves a plain single-process model (the benchmark compares the two).
- `train_fn_per_worker(loop_config)`: the Ray Train loop of one worker. loop_config is a plain dict
  `{"config": TrainConfig.to_dict(), "run_dir": str | None}` (Ray Tune passes the same). Each worker
  reads its own shard (DistributedSampler); every epoch ends with validation clean and PGD accuracy
  (sharded, summed over workers) and one `ray.train.report` with a checkpoint.
- `make_trainer` / `run`: the driver (TorchTrainer with FailureConfig, CheckpointConfig, storage
  inside RUN_DIR, on the same filesystem: `Location.for_ray_train()`).

A run folder RUN_DIR, a local path or a storage URI such as s3://bucket/runs/robust (written by rank 0
through storage.Location, on whichever node it runs: on several nodes RUN_DIR must be a URI or a folder
that every node mounts at the same path, which cluster.storage_preflight checks before training):
    config.yaml          the full resolved config
    metrics.jsonl        one JSON object per finished epoch
    best/                a robint checkpoint of the best epoch by `selection` (mean(val clean, val PGD) accuracy;
                         val clean for a standard model by default, as the authors)
    test.json            the best model's test clean and PGD accuracy (when config.test)
    tensorboard/         TensorBoard event files
    workers/rank*.json   pid and host of each training worker (of the latest attempt)
    ray/train/epoch_*/   Ray Train's checkpoints (the latest and the best are kept): a robint
                         checkpoint plus train_state.pt (optimiser, scheduler, best-so-far, history)

Resumption: after a worker failure Ray Train restarts the worker group and `ray.train.get_checkpoint()`
hands back the latest epoch's checkpoint; a new `run` on the same RUN_DIR (`robint train --resume`)
finds the same checkpoint through Ray Train's run snapshot in RUN_DIR/ray. Random state is not carried
over but re-derived: every epoch starts by seeding torch, numpy and random from (seed, epoch, rank), and
the sampler shuffles by (seed, epoch), so a resumed epoch draws the same crops, flips, shuffles and PGD
starts as it would have without the interruption.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .allocator import tune_allocator
from .attacks import pgd
from .checkpoint import META, WEIGHTS, initial_weights, load_checkpoint, read_meta, save_checkpoint
from .cluster import Job, WorkerRequest, storage_preflight, wait_for_room
from .config import OptimConfig, PGDSettings, TrainConfig, dump_config
from .data import load_split
from .distributed import init_ray
from .errors import check
from .evaluate import AttackConfig, evaluate
from .models import arch_spec, build_model
from .seeds import derived_seed
from .storage import Location

log = logging.getLogger(__name__)

STATE = "train_state.pt"
RAY_NAME = "train"  # RunConfig(name): Ray Train's files go to RUN_DIR/ray/train


# --- the math: one epoch -------------------------------------------------------------------------


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # The author's Adam: L2 penalty through weight_decay (torch.optim.Adam), not AdamW.
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int):
    """Stepped once per epoch."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max or epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when bf16, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def configure_cudnn(deterministic: bool) -> None:
    """cuDNN for a training worker: by default it times its kernels once for the fixed image size and
    keeps the fastest, which need not be deterministic (a rerun on the same GPU can differ in the last
    bits, and PGD amplifies that); deterministic=True asks for deterministic kernels instead."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def adversarial_batch(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pgd_cfg: PGDSettings,
    *,
    random_start: bool = False,
    bn_mode: str = "train",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The PGD images of the training attack (Algorithm 1, lines 4-7) under the budget pgd_cfg, computed
    on `module` (never a DDP wrapper) with batch norm in bn_mode. Parameter gradients are left untouched."""
    return pgd(
        module,
        x,
        y,
        threat=pgd_cfg.threat,
        steps=pgd_cfg.steps,
        random_start=random_start,
        model_mode=bn_mode,
        generator=generator,
    )


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    attack_model: nn.Module | None = None,
    pgd_cfg: PGDSettings | None = None,
    random_start: bool = False,
    bn_mode: str = "train",
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    generator: torch.Generator | None = None,
    grad_clip: float | None = None,
    on_batch: Callable[[int, int, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """One pass of SGD over `loader`; with pgd_cfg, on the PGD images of each batch (attack on
    attack_model, the module inside `model`'s DDP wrapper, or `model` itself; from a random start and
    with batch norm in bn_mode as `adversarial_batch`); with grad_clip, every
    gradient value is clipped to [-grad_clip, grad_clip] before each step (torch's clip_grad_value_, as the
    authors' trainers; under DDP after the gradients are averaged over workers).

    Returns this process's sums: {"loss_sum", "correct", "n"} (loss and accuracy on the images the
    model was trained on: adversarial ones in adversarial training). on_batch(i, n_seen, loss) is
    called after each batch (i from 1).
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    for i, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if pgd_cfg is not None:
            with autocast(device, bf16):
                x = adversarial_batch(
                    attack_model if attack_model is not None else model,
                    x,
                    y,
                    pgd_cfg,
                    random_start=random_start,
                    bn_mode=bn_mode,
                    generator=generator,
                )
        with autocast(device, bf16):
            logits = model(x)  # (B, classes)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), grad_clip)
        optimizer.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(dim=1) == y).sum()
        n += len(y)
        if on_batch is not None:
            on_batch(i, n, loss)
    return {"loss_sum": float(loss_sum), "correct": int(correct), "n": n}


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the workers of the default process group, differentiable: the gradient
    of each worker's input is the sum of every worker's output gradient (each worker's loss depends on
    the sum through its own copy)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose train-mode statistics cover the whole batch of every worker in the default
    process group, so each worker normalises as one process would on the concatenated batch (the
    authors trained on one GPU: batch norm saw all 128 / 200 images, in training and in the training
    attack). The mean and the variance are two differentiable all-reduces (`_AllReduceSum`: a worker's
    backward also carries the other workers' terms, so the input gradient of a summed loss equals the
    one-process one). Any backend, gloo on CPUs included (torch's SyncBatchNorm needs GPUs).
    One process, eval mode, or no process group: plain batch norm. Every worker must call it the same
    number of times (training and the training attack do: the same batches, the same PGD steps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        xf = x.float()
        dims = (0, 2, 3)
        channels = x.shape[1]
        count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        first = all_reduce(torch.cat([xf.sum(dims), count]))  # (C + 1,) sums and the image-pixel count
        total = first[-1]
        mean = first[:channels] / total
        centred = xf - mean.view(1, -1, 1, 1)
        var = all_reduce((centred * centred).sum(dims)) / total  # biased, as batch norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """module with every BatchNorm2d turned into SyncBatchNorm2d in place (same parameters, buffers and
    state-dict keys, so checkpoints load into the plain architecture)."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = SyncBatchNorm2d
    return module


def selection_score(clean_accuracy: float, adversarial_accuracy: float, *, rule: str = "mean") -> float:
    """The model-selection metric: "mean" of clean and adversarial accuracy (the paper's rule for the
    robust models) or "clean" accuracy alone (the authors' standard trainer, which measures no other)."""
    check(rule in ("mean", "clean"), f"selection rule must be mean or clean, got {rule!r}")
    return clean_accuracy if rule == "clean" else (clean_accuracy + adversarial_accuracy) / 2


# --- data ----------------------------------------------------------------------------------------


def subsample(dataset, n: int | None, seed: int):
    """A seeded random subset of n items (all when n is None), in dataset order, keeping the transform."""
    if n is None or n >= len(dataset):
        return dataset
    positions = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    return dataset.subset(positions, dataset.transform)


def load_data(cfg: TrainConfig, split: str):
    """The fit (augmented), val or test split of the run, subsampled as configured."""
    data = cfg.data
    dataset = load_split(
        data.path, split, augment=data.augment and split == "fit", val_fraction=data.val_fraction, seed=data.split_seed
    )
    n = {"fit": data.train_n, "val": data.val_n, "test": data.test_n}[split]
    return subsample(dataset, n, cfg.seed)


# --- one worker ----------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What survives a restart besides the weights, optimiser and scheduler."""

    epoch: int = 0  # last finished epoch
    best_epoch: int = 0
    best_score: float = -math.inf
    attempt: int = 1  # 1 + the number of times this run restarted from a checkpoint
    resumed_from: int = 0  # the epoch this attempt started after
    history: list[dict[str, Any]] = field(default_factory=list)


def _seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed torch, numpy and random from (seed, epoch, rank); returns the seed used."""
    value = derived_seed(seed, epoch, rank, layout="w0")
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _broadcast_state(module: nn.Module) -> None:
    """Every tensor of module's state (parameters and batch-norm statistics) from rank 0 to all."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def evaluate_sharded(
    module: nn.Module,
    dataset,
    pgd_cfg: PGDSettings,
    *,
    random_start: bool,
    rank: int,
    world: int,
    batch_size: int,
    device: torch.device,
    bf16: bool,
) -> dict[str, float]:
    """Clean and PGD accuracy (the budget pgd_cfg) over `dataset`, each worker taking every world-th item,
    summed over workers. Uses the foundation's evaluator (model in eval mode, last PGD iterate)."""
    attack = AttackConfig(kind="pgd", pgd=pgd_cfg, random_start=random_start)
    positions = np.arange(rank, len(dataset), world)
    counts = [0.0, 0.0, 0.0]
    if len(positions):
        with autocast(device, bf16):
            result = evaluate(module, dataset.subset(positions), attack=attack, batch_size=batch_size)
        counts = [result["n"], result["clean_correct"], result["adversarial_correct"]]
    n, clean, robust = _all_sum(counts, device)
    check(n > 0, "the evaluation split is empty")
    return {"n": int(n), "clean_accuracy": clean / n, "adversarial_accuracy": robust / n}


def _load_weights(module: nn.Module, path: Path) -> None:
    module.load_state_dict(load_file(str(path)))


def _restore(checkpoint, module: nn.Module, optimizer, scheduler) -> TrainState:
    """Weights, optimiser, scheduler and TrainState from a Ray Train checkpoint (None: fresh)."""
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as directory:
        _load_weights(module, Path(directory) / WEIGHTS)
        saved = torch.load(Path(directory) / STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return TrainState(
        epoch=saved["epoch"],
        best_epoch=saved["best_epoch"],
        best_score=saved["best_score"],
        attempt=saved["attempt"] + 1,
        resumed_from=saved["epoch"],
        history=list(saved["history"]),
    )


def _write_jsonl(target: Location, rows: list[dict[str, Any]]) -> None:
    """The whole file, atomically: object stores cannot append."""
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _repair_best(run_dir: Location, state: TrainState) -> None:
    """Make RUN_DIR/best the best epoch of the restored history: an epoch lost to a failure may have
    written best/ after the checkpoint that the run resumed from."""
    best = run_dir / "best"
    if state.best_epoch == 0:
        best.delete()
        return
    if (best / META).is_file() and read_meta(best).get("metrics", {}).get("epoch") == state.best_epoch:
        return
    source = run_dir / "ray" / RAY_NAME / f"epoch_{state.best_epoch:04d}"
    check((source / WEIGHTS).is_file(), f"{source}: the checkpoint of the best epoch is missing")
    for name in (WEIGHTS, META):  # the weights first: meta.json names their hash
        (best / name).write_bytes((source / name).read_bytes())
    log.info("best/ restored from epoch %d", state.best_epoch)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _worker_logging(rank: int) -> None:
    logger = logging.getLogger("robint_ray")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """The training loop of one Ray Train worker. loop_config: {"config": TrainConfig dict,
    "run_dir": absolute path, storage URI or None (then only Ray Train's checkpoints are written)}."""
    import ray.train

    worker = _setup(loop_config)
    cfg = worker.cfg
    fit, val = load_data(cfg, "fit"), load_data(cfg, "val")
    sampler, loader = _fit_loader(worker, fit)
    net = _model_and_optimiser(worker, cfg.num_classes or len(fit.classes))
    state = _restore(ray.train.get_checkpoint(), net.module, net.optimizer, net.scheduler)
    if state.epoch and worker.rank == 0:
        log.info("resuming after epoch %d (attempt %d)", state.epoch, state.attempt)
    with _run_files(worker, state) as board:
        generator = torch.Generator(device=worker.device)
        epoch_seconds: list[float] = []
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            generator.manual_seed(_seed_epoch(cfg.seed, epoch, worker.rank))
            sampler.set_epoch(epoch)
            metrics = _run_epoch(
                worker, net, loader, val, state, epoch=epoch, generator=generator, epoch_seconds=epoch_seconds
            )
            _report(worker, net, state, metrics, classes=fit.classes, board=board, epoch_seconds=epoch_seconds)
    if cfg.test and worker.run_dir is not None:
        _final_test(worker, net.module, state, classes=fit.classes)


@dataclass(frozen=True)
class _Worker:
    """One training worker's settings: the run's config, its RUN_DIR, its place in the group, its device."""

    cfg: TrainConfig
    run_dir: Location | None
    rank: int
    world: int
    device: torch.device
    bf16: bool  # bf16 autocast
    channels_last: bool  # images and weights in channels-last memory format


@dataclass(frozen=True)
class _Net:
    """What one worker trains: `model` (DDP-wrapped when world > 1), the `module` inside it (attacked,
    evaluated and saved), its optimiser and scheduler."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def _setup(loop_config: dict[str, Any]) -> _Worker:
    """This worker's config, rank, device and thread settings, from Ray Train's context."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["config"])
    run_dir = Location(loop_config["run_dir"]) if loop_config.get("run_dir") else None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _worker_logging(rank)
    torch.set_num_threads(cfg.cpus_per_worker)
    tune_allocator()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        configure_cudnn(cfg.deterministic)
    check(cfg.batch_size % world == 0, f"batch_size {cfg.batch_size} does not split evenly over {world} workers")
    return _Worker(
        cfg,
        run_dir,
        rank,
        world,
        device,
        bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu),
        channels_last=cfg.channels_last and on_gpu,
    )


def _fit_loader(worker: _Worker, fit):
    """(sampler, loader) of this worker's shard of the fit split: batch_size / world images a batch,
    shuffled by (seed, epoch) once the sampler's epoch is set."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    cfg = worker.cfg
    sampler = DistributedSampler(fit, num_replicas=worker.world, rank=worker.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(
        fit,
        batch_size=cfg.batch_size // worker.world,
        sampler=sampler,
        num_workers=cfg.data.loader_workers,
        pin_memory=worker.device.type == "cuda",
        persistent_workers=cfg.data.loader_workers > 0,
    )
    return sampler, loader


def initial_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model a run starts from: the weights `cfg.init` names, else a random initialisation seeded
    by cfg.seed (the same on every worker; DDP broadcasts rank 0's anyway)."""
    torch.manual_seed(cfg.seed)
    module = build_model(cfg.arch, num_classes)
    if cfg.init is not None:
        module.load_state_dict(initial_weights(cfg.init, arch=cfg.arch, num_classes=num_classes))
    return module


def _model_and_optimiser(worker: _Worker, num_classes: int) -> _Net:
    """The run's architecture with the same initial weights on every worker, prepared by Ray Train (on
    the device; DDP when world > 1), with its optimiser and scheduler."""
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    cfg = worker.cfg
    module = initial_model(cfg, num_classes)  # a resumed run's own checkpoint replaces its weights in _restore
    if cfg.sync_batch_norm and worker.world > 1:
        sync_batch_norm(module)
    if worker.channels_last:
        module = module.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(module)  # to the device; DDP when world > 1
    module = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    return _Net(model, module, optimizer, make_scheduler(optimizer, cfg.optim, cfg.epochs))


@dataclass(frozen=True)
class _Board:
    """Rank 0's TensorBoard writer, writing into the local folder `events` that RUN_DIR/tensorboard uploads."""

    writer: Any  # torch.utils.tensorboard.SummaryWriter
    events: Path
    target: Location

    def log(self, metrics: dict[str, Any]) -> None:
        for key in (
            "train_loss",
            "train_accuracy",
            "val_clean_accuracy",
            "val_adversarial_accuracy",
            "val_score",
            "lr",
            "train_images_per_s",
        ):
            self.writer.add_scalar(key, metrics[key], metrics["epoch"])
        self.writer.flush()
        if not self.target.is_local:
            self.target.upload(self.events)


@contextlib.contextmanager
def _run_files(worker: _Worker, state: TrainState):
    """This attempt's files in RUN_DIR: workers/rankN.json; on rank 0 also metrics.jsonl as restored,
    best/ made the restored best epoch, and a TensorBoard _Board (yielded; None on other ranks or
    without RUN_DIR), closed when the epochs are done."""
    run_dir = worker.run_dir
    if run_dir is not None:
        (run_dir / "workers" / f"rank{worker.rank}.json").write_json(
            {
                "rank": worker.rank,
                "world": worker.world,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "attempt": state.attempt,
                "resumed_from_epoch": state.epoch,
                "started": time.time(),
            }
        )
    if run_dir is None or worker.rank != 0:
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter

    _write_jsonl(run_dir / "metrics.jsonl", state.history)
    _repair_best(run_dir, state)
    with _local_folder(run_dir / "tensorboard") as events:  # TensorBoard writes local files only
        writer = SummaryWriter(str(events), purge_step=state.epoch + 1)
        yield _Board(writer, events, run_dir / "tensorboard")
        writer.close()


def _run_epoch(
    worker: _Worker,
    net: _Net,
    loader,
    val,
    state: TrainState,
    *,
    epoch: int,
    generator: torch.Generator,
    epoch_seconds: list[float],
) -> dict[str, Any]:
    """Train one epoch (on PGD images when adversarial), step the scheduler, validate clean and PGD
    accuracy on rank 0's weights, and record the epoch in `state` (best epoch, history) and its
    duration in epoch_seconds; returns the epoch's metrics (the same on every worker)."""
    cfg, started = worker.cfg, time.perf_counter()
    sums = train_epoch(
        net.model,
        loader,
        net.optimizer,
        attack_model=net.module,
        pgd_cfg=cfg.pgd if cfg.adversarial else None,
        random_start=cfg.pgd_random_start,
        bn_mode=cfg.pgd_bn_mode,
        device=worker.device,
        bf16=worker.bf16,
        channels_last=worker.channels_last,
        generator=generator,
        grad_clip=cfg.grad_clip,
        on_batch=_progress(worker, epoch, len(loader), started),
    )
    train_seconds = time.perf_counter() - started
    loss_sum, correct, n = _all_sum([sums["loss_sum"], sums["correct"], sums["n"]], worker.device)
    lr = net.optimizer.param_groups[0]["lr"]
    net.scheduler.step()
    # Rank 0's batch-norm statistics everywhere, so the evaluated model is the saved one.
    _broadcast_state(net.module)
    val_started = time.perf_counter()
    result = evaluate_sharded(
        net.module,
        val,
        cfg.val_pgd or cfg.pgd,
        random_start=cfg.pgd_random_start and cfg.val_pgd is None,  # a val_pgd starts at x
        rank=worker.rank,
        world=worker.world,
        batch_size=cfg.eval_batch_size,
        device=worker.device,
        bf16=worker.bf16,
    )
    score = selection_score(result["clean_accuracy"], result["adversarial_accuracy"], rule=cfg.selection_rule)
    if score > state.best_score:
        state.best_epoch, state.best_score = epoch, score
    epoch_seconds.append(time.perf_counter() - started)
    metrics = {
        "epoch": epoch,
        "train_loss": loss_sum / n,
        "train_accuracy": correct / n,
        "val_clean_accuracy": result["clean_accuracy"],
        "val_adversarial_accuracy": result["adversarial_accuracy"],
        "val_score": score,
        "best_epoch": state.best_epoch,
        "best_val_score": state.best_score,
        "lr": lr,
        "train_images": int(n),
        "val_images": result["n"],
        "train_seconds": train_seconds,
        "val_seconds": time.perf_counter() - val_started,
        "train_images_per_s": n / train_seconds,
        "attempt": state.attempt,
        "resumed_from_epoch": state.resumed_from,
        "workers": worker.world,
    }
    state.epoch = epoch
    state.history.append(metrics)
    return metrics


def _progress(worker: _Worker, epoch: int, batches: int, started: float) -> Callable[[int, int, torch.Tensor], None]:
    """train_epoch's on_batch: rank 0 logs loss, throughput and the epoch's ETA every log_every batches."""
    cfg = worker.cfg

    def progress(i: int, seen: int, loss: torch.Tensor) -> None:
        if worker.rank == 0 and (i % cfg.log_every == 0 or i == batches):
            elapsed = time.perf_counter() - started
            rate = seen * worker.world / elapsed
            log.info(
                "epoch %d/%d batch %d/%d loss %.4f  %.1f img/s  epoch ETA %s",
                epoch,
                cfg.epochs,
                i,
                batches,
                loss.item(),
                rate,
                _hms(elapsed / i * (batches - i)),
            )

    return progress


def _report(
    worker: _Worker,
    net: _Net,
    state: TrainState,
    metrics: dict[str, Any],
    *,
    classes: list[str],
    board: _Board | None,
    epoch_seconds: list[float],
) -> None:
    """ray.train.report the epoch's metrics; rank 0 attaches the checkpoint (weights + train_state.pt),
    waits until Ray Train has committed it, then writes metrics.jsonl, TensorBoard and best/."""
    import ray.train

    if worker.rank != 0:
        ray.train.report(metrics)
        return
    cfg, epoch = worker.cfg, metrics["epoch"]
    _log_epoch(cfg, metrics, best=state.best_epoch == epoch, epoch_seconds=epoch_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, net.module, classes=classes, config=cfg.to_dict(), metrics=metrics)
        torch.save(
            {
                "epoch": epoch,
                "optimizer": net.optimizer.state_dict(),
                "scheduler": net.scheduler.state_dict(),
                "best_epoch": state.best_epoch,
                "best_score": state.best_score,
                "attempt": state.attempt,
                "history": state.history,
            },
            Path(tmp) / STATE,
        )
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch_{epoch:04d}"
        )
    # Wait until the controller has registered the checkpoint (it polls workers every 2 s):
    # from here on a failure resumes after this epoch, and metrics.jsonl says so.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    if worker.run_dir is None:
        return
    _write_jsonl(worker.run_dir / "metrics.jsonl", state.history)
    board.log(metrics)
    if state.best_epoch == epoch:
        save_checkpoint(worker.run_dir / "best", net.module, classes=classes, config=cfg.to_dict(), metrics=metrics)


def _log_epoch(cfg: TrainConfig, metrics: dict[str, Any], *, best: bool, epoch_seconds: list[float]) -> None:
    epoch = metrics["epoch"]
    eta = sum(epoch_seconds) / len(epoch_seconds) * (cfg.epochs - epoch)
    log.info(
        "epoch %d/%d: train loss %.4f acc %.4f | val clean %.4f pgd %.4f score %.4f%s | %.1f img/s | "
        "%s per epoch, ETA %s",
        epoch,
        cfg.epochs,
        metrics["train_loss"],
        metrics["train_accuracy"],
        metrics["val_clean_accuracy"],
        metrics["val_adversarial_accuracy"],
        metrics["val_score"],
        " (best)" if best else "",
        metrics["train_images_per_s"],
        _hms(epoch_seconds[-1]),
        _hms(eta),
    )


def _final_test(worker: _Worker, module: nn.Module, state: TrainState, *, classes: list[str]) -> None:
    """The selected model (RUN_DIR/best) on the test split, once, at the end (never used for selection):
    test.json, the test figures added to best/meta.json, and one last report."""
    import ray.train

    cfg, run_dir, rank = worker.cfg, worker.run_dir, worker.rank
    if rank == 0:
        best, meta = load_checkpoint(run_dir / "best")
        module.load_state_dict(best.state_dict())
    _broadcast_state(module)
    test = load_data(cfg, "test")
    result = evaluate_sharded(
        module,
        test,
        cfg.pgd,
        random_start=cfg.pgd_random_start,
        rank=rank,
        world=worker.world,
        batch_size=cfg.eval_batch_size,
        device=worker.device,
        bf16=worker.bf16,
    )
    figures = {
        "test_clean_accuracy": result["clean_accuracy"],
        "test_adversarial_accuracy": result["adversarial_accuracy"],
        "test_images": result["n"],
        "test_epoch": state.best_epoch,
    }
    if rank == 0:
        log.info(
            "test (best epoch %d): clean %.4f pgd %.4f on %d images",
            state.best_epoch,
            figures["test_clean_accuracy"],
            figures["test_adversarial_accuracy"],
            result["n"],
        )
        attack = {**asdict(cfg.pgd), "random_start": cfg.pgd_random_start, "bn_mode": cfg.pgd_bn_mode}
        (run_dir / "test.json").write_json({**figures, "attack": attack})
        save_checkpoint(
            run_dir / "best", module, classes=classes, config=cfg.to_dict(), metrics={**meta["metrics"], **figures}
        )
    last_metrics = state.history[-1] if state.history else {}
    ray.train.report({**last_metrics, **figures})


@contextlib.contextmanager
def _local_folder(target: Location):
    """A local folder for files that `target` should hold: target itself where it is local, else a
    temporary folder (the caller uploads it; it is removed at the end)."""
    if target.is_local:
        target.mkdir()
        yield target.local_path
        return
    with tempfile.TemporaryDirectory(prefix="robint-tb-") as tmp:
        yield Path(tmp)


# --- the driver ----------------------------------------------------------------------------------


def make_trainer(
    cfg: TrainConfig,
    run_dir: str | Path | Location | None,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    storage_path: str | Path | Location | None = None,
    name: str = RAY_NAME,
    callbacks: list | None = None,
):
    """A TorchTrainer running train_fn_per_worker. run_dir and storage_path: local paths (made
    absolute) or storage URIs. Ray Train's storage is RUN_DIR/ray unless storage_path is given, on the
    filesystem the location names (storage_path + storage_filesystem); it keeps the latest and the best
    checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check(workers >= 1, f"--workers must be >= 1, got {workers}")
    check(gpus_per_worker >= 0, f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    run_dir = Location(run_dir) if run_dir is not None else None
    if storage_path is None:
        check(run_dir is not None, "give run_dir or storage_path")
    storage, storage_filesystem = (
        Location(storage_path) if storage_path is not None else run_dir / "ray"
    ).for_ray_train()
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir.uri if run_dir else None},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=storage_filesystem,
            callbacks=callbacks,  # e.g. Ray Tune's TuneReportCallback when a Tune trial runs the trainer
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ray always keeps the latest checkpoint too: these two are what resume and best/ need.
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_score", checkpoint_score_order="max"
            ),
        ),
    )


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """data.path and init made absolute where they name something here (workers do not share our cwd)."""
    path = cfg.data.path
    if path != "sample" and Path(path).exists():
        cfg = cfg.override({"data.path": str(Path(path).resolve())})
    if cfg.init is not None and "://" not in cfg.init and Path(cfg.init).exists():
        cfg = cfg.override({"init": str(Path(cfg.init).resolve())})
    return cfg


def preflight(cfg: TrainConfig, workers: int) -> None:
    """Fail here, with an InputError, on what would otherwise fail inside every worker."""
    arch_spec(cfg.arch)
    check(cfg.batch_size % workers == 0, f"batch_size {cfg.batch_size} does not split evenly over {workers} workers")
    val = load_data(cfg, "val")
    num_classes = cfg.num_classes or len(val.classes)
    check(
        int(val.labels.max()) < num_classes,
        f"the data has labels up to {int(val.labels.max())}, the model only {num_classes} classes",
    )
    if cfg.init is not None:  # a missing, foreign or mismatched file: one line, before any worker starts
        initial_weights(cfg.init, arch=cfg.arch, num_classes=num_classes)


def run(
    cfg: TrainConfig,
    run_dir: str | Path | Location,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    resume: bool = False,
    wait_s: float | None = None,
) -> dict[str, Any]:
    """Train (or, with resume, continue) the run in run_dir (a local path or a storage URI) on Ray;
    returns the last reported metrics. Waits up to wait_s for the cluster's room for every worker
    (`cluster.wait_for_room`; None: $ROBINT_WAIT_TIMEOUT, else 30 minutes)."""
    run_dir = Location(run_dir)
    started = (run_dir / "ray" / RAY_NAME).exists()
    if resume:
        check(started, f"{run_dir}: no run to resume (no {run_dir / 'ray' / RAY_NAME})")
    else:
        check(
            not started, f"{run_dir} already holds a run: continue it with --resume {run_dir}, or choose another --out"
        )
    cfg = resolve_paths(cfg)
    preflight(cfg, workers)
    init_ray()
    # A worker group the cluster cannot hold would leave Ray Train waiting for it forever.
    wait_for_room(Job(workers, WorkerRequest(cpus=cfg.cpus_per_worker, gpus=gpus_per_worker)), timeout_s=wait_s)
    storage_preflight(run_dir)  # every node can write and read there, before an epoch is spent
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    log.info(
        "training %s (%s) with %d worker(s) into %s",
        cfg.arch,
        "adversarial" if cfg.adversarial else "standard",
        workers,
        run_dir,
    )
    with sigint_handler_restored():
        result = make_trainer(cfg, run_dir, workers=workers, gpus_per_worker=gpus_per_worker).fit()
    return dict(result.metrics or {})


@contextlib.contextmanager
def sigint_handler_restored():
    """Ray Train's fit() (and Ray Tune's: `tune.run_sweep` uses this too) installs a SIGINT handler
    (Ctrl-C aborts the run) and leaves it installed: it holds the controller actor's handle, so the
    TrainController and its DatasetManager outlived every run of the process, and a later Ctrl-C (in a
    study, while it explains or generates) only asked the finished controller to abort, and was
    swallowed. The handler from before comes back after fit()."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        # None: a handler not set from Python, which cannot be set back; fit() sets one only in the main thread
        if previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)

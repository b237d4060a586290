"""Mini-batch training of the auto-encoder: seeded, batched, bf16 autocast on CUDA."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import select_device
from .errors import ConfigError
from .model import L2AutoEncoder

log = logging.getLogger(__name__)


@dataclass
class TrainingHistory:
    """Loss and throughput per epoch."""

    loss: list[float] = field(default_factory=list)
    samples_per_second: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "samples_per_second": self.samples_per_second,
            "seconds": self.seconds,
            "device": self.device,
        }


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA) and return a generator for batch order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def as_tensor(X: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move float32 data to ``device``; through pinned memory when copying to a GPU."""
    t = torch.as_tensor(X, dtype=torch.float32)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def is_main_process() -> bool:
    """``False`` only in a rank other than 0 of a distributed job: guard side effects with it.

    It reads the initialised default process group, else the ``WORLD_SIZE`` and ``RANK``
    variables ``torchrun`` sets, so it gives the same answer before and after training starts.
    Outside a distributed job it is always ``True``.

    Examples
    --------
    >>> is_main_process()
    True
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    launched = _torchrun_environment()
    return launched is None or launched[0] == 0


def _torchrun_environment() -> tuple[int, int, int] | None:
    """``(rank, local_rank, world_size)`` when ``torchrun`` started this process with > 1 rank."""
    import os

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not all(os.environ.get(name) for name in names):
        return None
    try:
        rank, local_rank, world_size = (int(os.environ[name]) for name in names)
    except ValueError:
        raise ConfigError(
            "RANK, LOCAL_RANK and WORLD_SIZE must be integers, got "
            + ", ".join(f"{name}={os.environ[name]!r}" for name in names)
        ) from None
    if world_size <= 1:
        return None
    if not (0 <= rank < world_size and local_rank >= 0):
        raise ConfigError(
            f"RANK={rank} and LOCAL_RANK={local_rank} invalid for WORLD_SIZE={world_size}"
        )
    return rank, local_rank, world_size


def _setup_distributed(device: torch.device) -> tuple[torch.device, int, int] | None:
    """Join the distributed job this process belongs to: ``(device, rank, world_size)``, or
    ``None`` when training runs in one process.

    Uses the default process group when the caller initialised one; else, under ``torchrun``,
    initialises it from the environment (``nccl`` on CUDA, else ``gloo``) and destroys it at exit.
    On CUDA each rank trains on ``cuda:LOCAL_RANK``, which also becomes the current device.
    """
    import torch.distributed as dist

    launched = _torchrun_environment()
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and launched is None:
        return None
    if not dist.is_available():
        raise ConfigError(
            f"WORLD_SIZE={launched[2]}: started for distributed training, but this torch build "
            "has no torch.distributed"
        )
    if device.type == "cuda":
        if launched is not None:
            index = launched[1]
        elif device.index is not None:
            index = device.index
        else:
            index = dist.get_rank() % torch.cuda.device_count()
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={index} but only {torch.cuda.device_count()} CUDA GPUs are visible"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    if not initialised:
        import atexit

        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
        log.info(
            "joined process group: rank %d of %d on %s (%s)",
            dist.get_rank(),
            dist.get_world_size(),
            device,
            dist.get_backend(),
        )
    if dist.get_world_size() == 1:
        return None
    return device, dist.get_rank(), dist.get_world_size()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of a permutation, every share of the same length.

    The permutation is padded with its own first entries to a multiple of ``world_size`` (as
    ``torch.utils.data.DistributedSampler`` does), so that every rank runs the same number of
    batches: a rank with one batch more would wait for the others' gradients forever.
    """
    n = len(order)
    padded = -(-n // world_size) * world_size
    if padded > n:
        order = order.repeat(-(-padded // n))[:padded]
    return order[rank::world_size]


def train_autoencoder(
    model: L2AutoEncoder,
    X: np.ndarray | torch.Tensor,
    *,
    epochs: int = 20,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    sample_weight: np.ndarray | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    description: str = "train",
) -> TrainingHistory:
    """Train ``model`` to reconstruct ``X`` with Adam and the mean squared error.

    The whole data set is moved to the device once and batches are drawn by index, which is
    faster than a ``DataLoader`` for data that fits in memory. On CUDA the forward pass runs under
    bf16 autocast. ``sample_weight`` (one non-negative weight per record) reweights the loss;
    records with weight 0 never influence training.

    Data-parallel training: in a ``torch.distributed`` job (a default process group the caller
    initialised, or ``torchrun`` with ``WORLD_SIZE`` > 1, in which case the group is initialised
    here with ``nccl`` on CUDA, else ``gloo``) ``model`` is wrapped in ``DistributedDataParallel``.
    Every rank passes the same ``X`` and ``seed``, draws the same permutation each epoch, and
    trains on its own disjoint shard of it; ``batch_size`` is per rank, so a step sees
    ``batch_size * world_size`` records and an epoch takes ``world_size`` times fewer steps. On
    CUDA, rank ``r`` trains on ``cuda:LOCAL_RANK``. The reported loss is the mean over all ranks,
    samples/s is for the whole job, and only rank 0 shows progress. ``model`` itself (not the
    wrapper) is trained, and its weights are identical on every rank afterwards. For example, on
    four GPUs of one machine (only the main process may save; see :func:`is_main_process`)::

        torchrun --nproc-per-node 4 -m stream_l2ae.cli train --data mnist --out models

    Examples
    --------
    >>> import numpy as np
    >>> from stream_l2ae.model import AutoEncoderConfig, L2AutoEncoder
    >>> X = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
    >>> model = L2AutoEncoder(AutoEncoderConfig((4,), hidden_units=(16,), embedding_dim=3))
    >>> history = train_autoencoder(model, X, epochs=3, batch_size=64, progress=False)
    >>> len(history.loss), history.loss[-1] < history.loss[0]
    (3, True)
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value!r}")
    if learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate!r}")
    n = len(X)
    if n == 0:
        raise ConfigError("cannot train on an empty data set")
    device = select_device(device)
    rank, world_size = 0, 1
    distributed = _setup_distributed(device)
    if distributed is not None:
        device, rank, world_size = distributed
        progress = progress and rank == 0
    generator = seed_everything(seed)
    model.to(device).train()
    data = as_tensor(X, device)
    weights = None
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float32)
        if sample_weight.shape != (n,) or (sample_weight < 0).any():
            raise ConfigError("sample_weight must hold one non-negative weight per record")
        weights = torch.as_tensor(sample_weight / max(sample_weight.mean(), 1e-12)).to(device)
    network: torch.nn.Module = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The constructor broadcasts rank 0's weights, so every rank starts from the same ones.
        network = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = TrainingHistory(device=str(device))
    started = time.perf_counter()
    shard_size = n if world_size == 1 else -(-n // world_size)
    n_batches = (shard_size + batch_size - 1) // batch_size
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        if world_size > 1:
            order = _shard(order, rank, world_size)
        order = order.to(device)
        epoch_started = time.perf_counter()
        total = torch.zeros((), device=device)
        bar = tqdm(
            total=n_batches,
            desc=f"{description} epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        for i in range(n_batches):
            index = order[i * batch_size : (i + 1) * batch_size]
            batch = data[index]
            with autocast:
                x_hat, _ = network(batch)
            per_record = (x_hat.float() - batch).pow(2).flatten(1).mean(dim=1)
            if weights is not None:
                per_record = per_record * weights[index]
            loss = per_record.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
            bar.update()
        bar.close()
        if world_size > 1:
            epoch_loss = _all_ranks_mean(total, len(order), device)
        else:
            epoch_loss = float(total) / n
        elapsed = time.perf_counter() - epoch_started
        history.loss.append(epoch_loss)
        history.samples_per_second.append(n / max(elapsed, 1e-9))
        if rank == 0:
            log.info(
                "%s epoch %d/%d loss %.5f (%.0f samples/s on %s%s)",
                description,
                epoch + 1,
                epochs,
                epoch_loss,
                history.samples_per_second[-1],
                device,
                f" x {world_size} ranks" if world_size > 1 else "",
            )
        if progress:
            tqdm.write(
                f"{description} epoch {epoch + 1}/{epochs}: loss {epoch_loss:.5f}, "
                f"{history.samples_per_second[-1]:,.0f} samples/s"
            )
    if world_size > 1:
        _broadcast_buffers(model)
        del network
    history.seconds = time.perf_counter() - started
    model.eval()
    return history


def _all_ranks_mean(total: torch.Tensor, count: int, device: torch.device) -> float:
    """Sum ``total`` and ``count`` over all ranks and return their ratio (on every rank)."""
    import torch.distributed as dist

    sums = torch.stack([total.double(), torch.tensor(float(count), device=device).double()])
    dist.all_reduce(sums)
    return float(sums[0] / sums[1])


def _broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (e.g. batch-norm statistics, updated rank-locally) to every rank."""
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


@torch.no_grad()
def embed(
    model: L2AutoEncoder,
    X: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 4096,
    with_reconstruction_error: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings (and optionally reconstruction errors) of ``X``, on the model's device."""
    device = next(model.parameters()).device
    if model.training:
        model.eval()
    data = as_tensor(X, device)
    zs, errors = [], []
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        if with_reconstruction_error:
            x_hat, z = model(batch)
            errors.append((x_hat - batch).pow(2).flatten(1).mean(dim=1))
        else:
            z = model.embed(batch)
        zs.append(z)
    if len(zs) == 1:
        return zs[0], (errors[0] if with_reconstruction_error else None)
    z = torch.cat(zs) if zs else torch.empty(0, model.config.embedding_dim, device=device)
    return z, (torch.cat(errors) if errors else None)

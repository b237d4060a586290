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
    generator = seed_everything(seed)
    model.to(device).train()
    data = as_tensor(X, device)
    weights = None
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float32)
        if sample_weight.shape != (n,) or (sample_weight < 0).any():
            raise ConfigError("sample_weight must hold one non-negative weight per record")
        weights = torch.as_tensor(sample_weight / max(sample_weight.mean(), 1e-12)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    history = TrainingHistory(device=str(device))
    started = time.perf_counter()
    n_batches = (n + batch_size - 1) // batch_size
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
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
                x_hat, _ = model(batch)
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
        elapsed = time.perf_counter() - epoch_started
        epoch_loss = float(total) / n
        history.loss.append(epoch_loss)
        history.samples_per_second.append(n / max(elapsed, 1e-9))
        log.info(
            "%s epoch %d/%d loss %.5f (%.0f samples/s on %s)",
            description,
            epoch + 1,
            epochs,
            epoch_loss,
            history.samples_per_second[-1],
            device,
        )
        if progress:
            tqdm.write(
                f"{description} epoch {epoch + 1}/{epochs}: loss {epoch_loss:.5f}, "
                f"{history.samples_per_second[-1]:,.0f} samples/s"
            )
    history.seconds = time.perf_counter() - started
    model.eval()
    return history


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

"""The auto-encoder of Aytekin et al. (2018), whose embedding is l2-normalized during training.

The decoder reconstructs the input from the unit vector ``z = E(x) / ||E(x)||``, so the embedding
space the auto-encoder learns is the unit sphere that k-means and the cosine score work on. Two
variants are picked from the input shape: a dense ``d-500-500-2000-10`` network for vectors and a
``32-64-128`` convolutional network for images shaped ``(C, H, W)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

DENSE = "dense"
CONV = "conv"


@dataclass(frozen=True)
class AutoEncoderConfig:
    """Architecture of an :class:`L2AutoEncoder`.

    Parameters
    ----------
    input_shape
        ``(d,)`` for feature vectors, ``(C, H, W)`` for images.
    kind
        ``"dense"`` or ``"conv"``; by default ``"conv"`` for 3-d input shapes, else ``"dense"``.
    hidden_units
        Widths of the dense encoder's hidden layers (the decoder mirrors them).
    conv_channels
        Channels of the convolutional encoder's layers, each halving the spatial size.
    embedding_dim
        Size of the embedding ``z``.
    l2_normalize
        Normalize the embedding to unit length during training (the paper's method). ``False``
        trains a plain auto-encoder, for the ablation.

    Examples
    --------
    >>> AutoEncoderConfig(input_shape=(9,)).kind
    'dense'
    >>> AutoEncoderConfig(input_shape=(1, 28, 28)).kind
    'conv'
    """

    input_shape: tuple[int, ...]
    kind: str | None = None
    hidden_units: tuple[int, ...] = (500, 500, 2000)
    conv_channels: tuple[int, ...] = (32, 64, 128)
    embedding_dim: int = 10
    l2_normalize: bool = True

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.input_shape)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "hidden_units", tuple(int(h) for h in self.hidden_units))
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        if not shape or any(s <= 0 for s in shape):
            raise ConfigError(f"input_shape must hold positive sizes, got {self.input_shape!r}")
        kind = self.kind or (CONV if len(shape) == 3 else DENSE)
        if kind not in (DENSE, CONV):
            raise ConfigError(f"kind must be 'dense' or 'conv', got {self.kind!r}")
        if kind == CONV and len(shape) != 3:
            raise ConfigError(f"a conv auto-encoder needs input_shape (C, H, W), got {shape!r}")
        object.__setattr__(self, "kind", kind)
        if self.embedding_dim < 2:
            raise ConfigError(f"embedding_dim must be >= 2, got {self.embedding_dim!r}")
        if any(h <= 0 for h in self.hidden_units):
            raise ConfigError(f"hidden_units must be positive, got {self.hidden_units!r}")
        if any(c <= 0 for c in self.conv_channels):
            raise ConfigError(f"conv_channels must be positive, got {self.conv_channels!r}")
        if kind == CONV and not self.conv_channels:
            raise ConfigError("a conv auto-encoder needs at least one conv_channels entry")

    @property
    def n_inputs(self) -> int:
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("input_shape", "hidden_units", "conv_channels"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoEncoderConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("input_shape", "hidden_units", "conv_channels"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def _dense_stack(widths: list[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _ConvEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], dim: int):
        super().__init__()
        kernels = [5] * (len(channels) - 1) + [3]
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c_out, k in zip(channels, kernels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            sizes = [tuple(input_shape[1:])]
            probe = torch.zeros(1, *input_shape)
            for layer in self.features:
                probe = layer(probe)
                if isinstance(layer, nn.Conv2d):
                    sizes.append(tuple(probe.shape[2:]))
        self.spatial_sizes = sizes
        self.feature_shape = tuple(probe.shape[1:])
        self.project = nn.Linear(probe.numel(), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x).flatten(1))


class _ConvDecoder(nn.Module):
    def __init__(
        self, encoder: _ConvEncoder, out_channels: int, channels: tuple[int, ...], dim: int
    ):
        super().__init__()
        self.feature_shape = encoder.feature_shape
        self.output_sizes = list(reversed(encoder.spatial_sizes[:-1]))
        self.expand = nn.Linear(dim, int(torch.tensor(self.feature_shape).prod()))
        kernels = list(reversed([5] * (len(channels) - 1) + [3]))
        chans = list(reversed(channels)) + [out_channels]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, k, stride=2, padding=k // 2)
            for c_in, c_out, k in zip(chans[:-1], chans[1:], kernels, strict=True)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.expand(z)).view(-1, *self.feature_shape)
        for i, (deconv, size) in enumerate(zip(self.deconvs, self.output_sizes, strict=True)):
            h = deconv(h, output_size=list(size))
            if i < len(self.deconvs) - 1:
                h = torch.relu(h)
        return h


class L2AutoEncoder(nn.Module):
    """Auto-encoder whose decoder sees the l2-normalized embedding.

    Examples
    --------
    >>> import torch
    >>> model = L2AutoEncoder(AutoEncoderConfig(input_shape=(9,), hidden_units=(16, 16)))
    >>> x_hat, z = model(torch.randn(4, 9))
    >>> tuple(x_hat.shape), tuple(z.shape)
    ((4, 9), (4, 10))
    >>> torch.allclose(z.norm(dim=1), torch.ones(4))
    True
    """

    def __init__(self, config: AutoEncoderConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embedding_dim
        if config.kind == DENSE:
            widths = [config.n_inputs, *config.hidden_units, dim]
            self.encoder = _dense_stack(widths, final_activation=False)
            self.decoder = _dense_stack(list(reversed(widths)), final_activation=False)
        else:
            encoder = _ConvEncoder(config.input_shape, config.conv_channels, dim)
            self.encoder = encoder
            self.decoder = _ConvDecoder(encoder, config.input_shape[0], config.conv_channels, dim)

    def _as_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.kind == DENSE:
            return x.reshape(x.shape[0], -1)
        return x.reshape(x.shape[0], *self.config.input_shape)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding the decoder sees: unit vectors when ``l2_normalize`` is on."""
        h = self.encoder(self._as_input(x))
        if self.config.l2_normalize:
            h = nn.functional.normalize(h, dim=1, eps=1e-12)
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        x_hat = self.decoder(z)
        return x_hat.reshape(x.shape), z

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error per record."""
        x_hat, _ = self(x)
        return (x_hat - x).pow(2).flatten(1).mean(dim=1)

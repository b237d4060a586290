"""The l2-normalized auto-encoder (model.py) and its training loop (training.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stream_l2ae.errors import ConfigError
from stream_l2ae.model import CONV, DENSE, AutoEncoderConfig, L2AutoEncoder
from stream_l2ae.training import embed, train_autoencoder

DENSE_SHAPE = (9,)
CONV_SHAPE = (1, 8, 8)


def make_model(input_shape, *, l2_normalize=True, seed=0, **overrides) -> L2AutoEncoder:
    torch.manual_seed(seed)
    config = AutoEncoderConfig(
        input_shape=input_shape,
        hidden_units=(16, 16),
        conv_channels=(4, 8, 8),
        embedding_dim=overrides.pop("embedding_dim", 5),
        l2_normalize=l2_normalize,
        **overrides,
    )
    return L2AutoEncoder(config).eval()


def random_input(input_shape, n=16, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *input_shape, generator=generator)


def last_encoder_layer(model: L2AutoEncoder) -> torch.nn.Linear:
    layer = model.encoder[-1] if model.config.kind == DENSE else model.encoder.project
    assert isinstance(layer, torch.nn.Linear)
    return layer


def structured_data(n=512, n_outliers=0, seed=0) -> np.ndarray:
    """Records near a 3-d subspace of R^9, then ``n_outliers`` far-off records."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3))
    X = latent @ rng.normal(size=(3, 9)) + 0.05 * rng.normal(size=(n, 9))
    outliers = 4.0 + 2.0 * rng.normal(size=(n_outliers, 9))
    return np.vstack([X, outliers]).astype(np.float32)


# ----- architecture -----------------------------------------------------------------------------


@pytest.mark.parametrize("input_shape", [DENSE_SHAPE, CONV_SHAPE], ids=["dense", "conv"])
def test_embedding_is_unit_norm(input_shape):
    model = make_model(input_shape)
    with torch.no_grad():
        x_hat, z = model(random_input(input_shape))
        embedded = model.embed(random_input(input_shape))
    assert z.shape == (16, 5)
    assert x_hat.shape == (16, *input_shape)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(embedded, z)


@pytest.mark.parametrize("input_shape", [DENSE_SHAPE, CONV_SHAPE], ids=["dense", "conv"])
def test_l2_switch_off_leaves_embedding_unnormalized(input_shape):
    model = make_model(input_shape, l2_normalize=False)
    with torch.no_grad():
        _, z = model(random_input(input_shape))
    norms = z.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)


@pytest.mark.parametrize("input_shape", [DENSE_SHAPE, CONV_SHAPE], ids=["dense", "conv"])
def test_decoder_receives_the_normalized_embedding(input_shape):
    """Scaling the encoder output by 5 is invisible to the decoder only when l2 is on."""
    x = random_input(input_shape)
    for l2_normalize in (True, False):
        model = make_model(input_shape, l2_normalize=l2_normalize)
        with torch.no_grad():
            before, _ = model(x)
            layer = last_encoder_layer(model)
            layer.weight.mul_(5.0)
            layer.bias.mul_(5.0)
            after, _ = model(x)
        if l2_normalize:
            torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        else:
            assert (after - before).abs().max() > 1e-2


def test_decoder_input_is_the_embedding():
    model = make_model(DENSE_SHAPE)
    x = random_input(DENSE_SHAPE)
    with torch.no_grad():
        x_hat, z = model(x)
        torch.testing.assert_close(model.decode(z), x_hat)
        errors = model.reconstruction_error(x)
    torch.testing.assert_close(errors, (x_hat - x).pow(2).mean(dim=1))


@pytest.mark.parametrize(
    ("input_shape", "kind", "expected"),
    [
        ((9,), None, DENSE),
        ((3, 4), None, DENSE),
        ((1, 8, 8), None, CONV),
        ((3, 9, 7), None, CONV),
        ((1, 8, 8), "dense", DENSE),
    ],
)
def test_kind_is_picked_from_the_input_shape(input_shape, kind, expected):
    config = AutoEncoderConfig(input_shape=input_shape, kind=kind, hidden_units=(8,))
    assert config.kind == expected


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28), (2, 9, 7), (3, 5, 5)])
def test_conv_reconstruction_has_the_input_shape(input_shape):
    model = make_model(input_shape)
    assert model.config.kind == CONV
    with torch.no_grad():
        x_hat, z = model(random_input(input_shape, n=3))
    assert x_hat.shape == (3, *input_shape)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


def test_dense_kind_accepts_image_input():
    model = make_model(CONV_SHAPE, kind="dense")
    with torch.no_grad():
        x_hat, z = model(random_input(CONV_SHAPE, n=4))
    assert x_hat.shape == (4, *CONV_SHAPE)
    assert z.shape == (4, 5)


def test_config_round_trip_through_json():
    config = AutoEncoderConfig(
        input_shape=(1, 8, 8), conv_channels=(4, 8, 8), embedding_dim=6, l2_normalize=False
    )
    document = json.loads(json.dumps(config.to_dict()))
    assert document["input_shape"] == [1, 8, 8]
    restored = AutoEncoderConfig.from_dict(document)
    assert restored == config
    assert restored.kind == CONV and restored.conv_channels == (4, 8, 8)
    assert isinstance(restored.input_shape, tuple)


def test_config_round_trip_keeps_model_weights_loadable():
    model = make_model(DENSE_SHAPE)
    twin = L2AutoEncoder(AutoEncoderConfig.from_dict(model.config.to_dict()))
    twin.load_state_dict(model.state_dict(), strict=True)
    x = random_input(DENSE_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x)[0], model(x)[0])


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"input_shape": (0,)}, "(0,)"),
        ({"input_shape": (9, -1)}, "-1"),
        ({"input_shape": ()}, "()"),
        ({"input_shape": (9,), "kind": "bogus"}, "'bogus'"),
        ({"input_shape": (9,), "kind": "conv"}, "(9,)"),
        ({"input_shape": (9,), "embedding_dim": 1}, "embedding_dim must be >= 2, got 1"),
        ({"input_shape": (9,), "hidden_units": (16, -3)}, "-3"),
        ({"input_shape": (1, 8, 8), "conv_channels": (4, 0)}, "(4, 0)"),
    ],
)
def test_invalid_config_raises_config_error_naming_the_value(settings, named):
    with pytest.raises(ConfigError) as excinfo:
        AutoEncoderConfig(**settings)
    assert named in str(excinfo.value)


def test_empty_conv_channels_are_rejected_by_the_config():
    with pytest.raises(ConfigError, match="conv_channels"):
        AutoEncoderConfig(input_shape=(1, 8, 8), conv_channels=())


def test_dense_model_without_hidden_layers():
    model = L2AutoEncoder(AutoEncoderConfig(input_shape=(9,), hidden_units=(), embedding_dim=3))
    with torch.no_grad():
        x_hat, z = model(random_input(DENSE_SHAPE, n=4))
    assert x_hat.shape == (4, 9)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


def test_invalid_sizes_raise_config_error():
    for settings in ({"hidden_units": (16, 0)}, {"conv_channels": (4, -8)}):
        with pytest.raises(ConfigError, match="positive"):
            AutoEncoderConfig(input_shape=(9,), **settings)


# ----- training ---------------------------------------------------------------------------------


def train(X, *, seed=0, epochs=8, sample_weight=None, init_seed=0, **kwargs):
    model = make_model(DENSE_SHAPE, seed=init_seed)
    history = train_autoencoder(
        model, X, epochs=epochs, batch_size=64, learning_rate=3e-3, seed=seed,
        sample_weight=sample_weight, device="cpu", progress=False, **kwargs,
    )  # fmt: skip
    return model, history


def test_training_reduces_the_loss_and_returns_eval_mode():
    X = structured_data()
    model, history = train(X, epochs=10)
    assert len(history.loss) == 10 == len(history.samples_per_second)
    assert history.loss[-1] < 0.75 * history.loss[0]
    assert history.device == "cpu"
    assert history.seconds > 0
    assert not model.training
    assert json.loads(json.dumps(history.to_dict()))["loss"] == history.loss


def test_training_is_seeded():
    X = structured_data()
    first, history_a = train(X, seed=3)
    second, history_b = train(X, seed=3)
    assert history_a.loss == history_b.loss
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    _, history_c = train(X, seed=4)
    assert history_c.loss != history_a.loss


def test_zero_weighted_records_have_no_influence():
    """The content of zero-weighted records cannot change the trained weights."""
    X = structured_data(n=448, n_outliers=64)
    weight = np.r_[np.ones(448), np.zeros(64)].astype(np.float32)
    other = X.copy()
    other[448:] = -other[448:] * 3.0 + 1.0
    first, history_a = train(X, sample_weight=weight, epochs=3)
    second, history_b = train(other, sample_weight=weight, epochs=3)
    assert history_a.loss == history_b.loss
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(tensor, second.state_dict()[name], rtol=0, atol=1e-7)


def test_zero_weighted_outliers_stay_badly_reconstructed():
    X = structured_data(n=448, n_outliers=64)
    outliers = torch.as_tensor(X[448:])
    weighted, _ = train(X, sample_weight=np.r_[np.ones(448), np.zeros(64)], epochs=15)
    unweighted, _ = train(X, sample_weight=np.ones(512), epochs=15)
    with torch.no_grad():
        error_ignored = weighted.reconstruction_error(outliers).mean()
        error_learned = unweighted.reconstruction_error(outliers).mean()
    assert error_ignored > 2.0 * error_learned


def test_uniform_sample_weight_equals_no_weight():
    X = structured_data()
    _, plain = train(X, epochs=3)
    _, uniform = train(X, epochs=3, sample_weight=np.full(len(X), 2.5))
    np.testing.assert_allclose(uniform.loss, plain.loss, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0, got 0.0"),
        ({"sample_weight": -np.ones(512)}, "sample_weight"),
        ({"sample_weight": np.ones(3)}, "sample_weight"),
    ],
)
def test_invalid_training_settings_raise_config_error(kwargs, named):
    model = make_model(DENSE_SHAPE)
    settings = {"epochs": 1, "batch_size": 64, **kwargs}
    with pytest.raises(ConfigError) as excinfo:
        train_autoencoder(model, structured_data(), progress=False, device="cpu", **settings)
    assert named in str(excinfo.value)


def test_training_on_empty_data_raises_config_error():
    with pytest.raises(ConfigError, match="empty"):
        train_autoencoder(make_model(DENSE_SHAPE), np.empty((0, 9), np.float32), progress=False)


def test_embed_helper_matches_the_model():
    X = structured_data(n=100)
    model = make_model(DENSE_SHAPE)
    z, errors = embed(model, X, batch_size=32, with_reconstruction_error=True)
    z_only, none = embed(model, X, batch_size=7)
    assert none is None
    torch.testing.assert_close(z_only, z)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(100))
    with torch.no_grad():
        torch.testing.assert_close(errors, model.reconstruction_error(torch.as_tensor(X)))
    empty, _ = embed(model, np.empty((0, 9), np.float32))
    assert empty.shape == (0, 5)

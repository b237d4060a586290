"""Data-parallel training: two CPU ranks (gloo) agree on the weights, and one process is unchanged.

The ranks are real processes started with ``torch.multiprocessing``; every rank writes what it
ends with to a file, and the test compares the files.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stream_l2ae.model import AutoEncoderConfig, L2AutoEncoder
from stream_l2ae.training import _shard, is_main_process, train_autoencoder

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD_SIZE = 2
N_RECORDS = 203  # not a multiple of WORLD_SIZE * BATCH: shards are padded, batches uneven
BATCH = 16
EPOCHS = 2
LEARNING_RATE = 1e-2
SEED = 3
DEADLINE_SECONDS = 120.0
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _data() -> np.ndarray:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 6))
    return (centers[rng.integers(0, 3, N_RECORDS)] + 0.1 * rng.normal(size=(N_RECORDS, 6))).astype(
        np.float32
    )


def _model() -> L2AutoEncoder:
    torch.manual_seed(SEED)
    return L2AutoEncoder(AutoEncoderConfig((6,), hidden_units=(16,), embedding_dim=3))


def _train(model: L2AutoEncoder, X: np.ndarray):
    return train_autoencoder(
        model,
        X,
        epochs=EPOCHS,
        batch_size=BATCH,
        learning_rate=LEARNING_RATE,
        seed=SEED,
        device="cpu",
        progress=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, out: str, port: int, launcher: str) -> None:
    """One rank: join the job, train, write the weights and the history to ``out``."""
    torch.set_num_threads(1)
    if launcher == "torchrun":
        # What torchrun sets: train_autoencoder initialises the process group itself.
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD_SIZE),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        main_before_init = is_main_process()
    else:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
        )
        main_before_init = is_main_process()
    model = _model()
    if rank == 1:
        with torch.no_grad():  # DDP must start every rank from rank 0's weights
            for parameter in model.parameters():
                parameter.add_(1.0)
    history = _train(model, _data())
    torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    report = {**history.to_dict(), "main_before": main_before_init, "main": is_main_process()}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _run_ranks(tmp_path: Path, launcher: str) -> list[tuple[dict, dict]]:
    saved = {name: os.environ.pop(name) for name in TORCHRUN_VARIABLES if name in os.environ}
    try:
        context = mp.start_processes(
            _rank_main,
            args=(str(tmp_path), _free_port(), launcher),
            nprocs=WORLD_SIZE,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the ranks did not finish within {DEADLINE_SECONDS:.0f} s")
    finally:
        os.environ.update(saved)
    return [
        (
            torch.load(tmp_path / f"rank{rank}.pt", weights_only=True),
            json.loads((tmp_path / f"rank{rank}.json").read_text()),
        )
        for rank in range(WORLD_SIZE)
    ]


def _reference_data_parallel(X: np.ndarray) -> dict[str, torch.Tensor]:
    """Data parallelism in one process: each step averages the ranks' mean losses.

    With equal per-rank batches that is the gradient DistributedDataParallel averages, so the
    weights must match the two ranks' up to float rounding.
    """
    model = _model()
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    data = torch.as_tensor(X)
    n_batches = math.ceil(math.ceil(N_RECORDS / WORLD_SIZE) / BATCH)
    for _ in range(EPOCHS):
        order = torch.randperm(N_RECORDS, generator=generator)
        shards = [_shard(order, rank, WORLD_SIZE) for rank in range(WORLD_SIZE)]
        for i in range(n_batches):
            losses = []
            for shard in shards:
                batch = data[shard[i * BATCH : (i + 1) * BATCH]]
                x_hat, _ = model(batch)
                losses.append((x_hat - batch).pow(2).flatten(1).mean(dim=1).mean())
            optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).mean().backward()
            optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("launcher", ["init_process_group", "torchrun"])
def test_two_ranks_end_with_identical_weights(tmp_path, launcher):
    (weights0, report0), (weights1, report1) = _run_ranks(tmp_path, launcher)
    assert weights0.keys() == weights1.keys()
    for name in weights0:
        assert torch.equal(weights0[name], weights1[name]), name
    assert report0["loss"] == report1["loss"]  # all-reduced: every rank reports the job's loss
    assert len(report0["loss"]) == EPOCHS and report0["loss"][1] < report0["loss"][0]
    assert (report0["main_before"], report0["main"]) == (True, True)
    assert (report1["main_before"], report1["main"]) == (False, False)
    reference = _reference_data_parallel(_data())
    for name in weights0:
        torch.testing.assert_close(weights0[name], reference[name], rtol=1e-4, atol=1e-5)


def test_shards_are_disjoint_and_equal_length():
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    shards = [_shard(order, rank, 4) for rank in range(4)]
    assert {len(shard) for shard in shards} == {3}
    assert sorted(torch.cat(shards)[:11].tolist()) == list(range(11))  # the first 11 are a cover
    assert set(torch.cat(shards).tolist()) == set(range(11))
    tiny = [_shard(torch.tensor([5]), rank, 3) for rank in range(3)]
    assert [shard.tolist() for shard in tiny] == [[5], [5], [5]]


def test_one_process_is_unchanged_by_ddp_support(monkeypatch):
    """Outside a job (and with WORLD_SIZE=1) training is the original single-process loop."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not dist.is_initialized() and is_main_process()
    X = _data()
    model = _model()
    history = _train(model, X)
    assert not dist.is_initialized()
    assert not model.training

    reference = _model()
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(reference.parameters(), lr=LEARNING_RATE)
    data = torch.as_tensor(X)
    losses = []
    for _ in range(EPOCHS):
        order = torch.randperm(N_RECORDS, generator=generator)
        total = torch.zeros(())
        for start in range(0, N_RECORDS, BATCH):
            index = order[start : start + BATCH]
            batch = data[index]
            x_hat, _ = reference(batch)
            loss = (x_hat.float() - batch).pow(2).flatten(1).mean(dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
        losses.append(float(total) / N_RECORDS)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert history.loss == losses


def test_is_main_process_reads_the_torchrun_environment(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("RANK", "2")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()

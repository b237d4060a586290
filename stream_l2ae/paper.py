"""Reproduction of the paper's MNIST tables: ``stream-l2ae bench paper``.

Aytekin et al. (2018) report, on the 70,000 MNIST images:

* clustering accuracy (k = 10, Hungarian matching): conv AE + l2 95.11 %, conv AE without l2
  84.90 %, dense AE + l2 90.20 %;
* anomaly detection, one digit the anomaly and the other nine normal, k = 9: mean AUC 0.9075 for
  the l2 cluster score, 0.6717 for the reconstruction-error baseline.

The clustering table trains on all images and clusters all of them. The anomaly table trains on
the nine normal digits of the training split and scores the whole test split, where the tenth
digit is the anomaly. Each auto-encoder is trained from the same seed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import load_dataset
from .device import select_device
from .evaluation import clustering_accuracy, roc_auc
from .kmeans import fit_kmeans
from .model import AutoEncoderConfig, L2AutoEncoder
from .scoring import score_embeddings
from .training import embed, train_autoencoder

MNIST_TRAIN = 60_000

PAPER_CLUSTERING_ACC = {"conv_l2": 0.9511, "conv": 0.8490, "dense_l2": 0.9020, "dense": None}
PAPER_ANOMALY_MEAN_AUC = {"l2": 0.9075, "no_l2": None, "reconstruction": 0.6717}


def _train(
    X: np.ndarray,
    kind: str,
    l2: bool,
    epochs: int,
    device: torch.device,
    progress: bool,
    label: str,
    seed: int = 0,
) -> tuple[L2AutoEncoder, dict[str, Any]]:
    torch.manual_seed(seed)
    model = L2AutoEncoder(AutoEncoderConfig(input_shape=X.shape[1:], kind=kind, l2_normalize=l2))
    history = train_autoencoder(
        model,
        X,
        epochs=epochs,
        batch_size=256,
        seed=seed,
        device=device,
        progress=progress,
        description=label,
    )
    return model, history.to_dict()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_clustering(
    X: np.ndarray, y: np.ndarray, *, epochs: int, device: torch.device, progress: bool
) -> dict[str, Any]:
    results = {}
    for kind in ("dense", "conv"):
        for l2 in (True, False):
            name = f"{kind}_l2" if l2 else kind
            started = time.perf_counter()
            model, history = _train(X, kind, l2, epochs, device, progress, f"cluster {name}")
            z, _ = embed(model, X)
            clusters = fit_kmeans(z.cpu().numpy(), 10, n_init=10)
            results[name] = {
                "accuracy": clustering_accuracy(y, clusters.labels),
                "final_loss": history["loss"][-1],
                "samples_per_second": float(np.mean(history["samples_per_second"])),
                "seconds": time.perf_counter() - started,
            }
            _say(f"clustering {name}: accuracy {results[name]['accuracy']:.4f}")
    return results


def run_anomaly(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    digits: list[int],
    kind: str,
    epochs: int,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    per_digit: dict[str, dict[str, float]] = {}
    for digit in digits:
        normal = X_train[y_train != digit]
        is_anomaly = (y_test == digit).astype(int)
        aucs = {}
        for l2 in (True, False):
            label = f"digit {digit} {'l2' if l2 else 'no-l2'}"
            model, _ = _train(normal, kind, l2, epochs, device, progress, label)
            z_train, _ = embed(model, normal)
            centroids = fit_kmeans(z_train.cpu().numpy(), 9, n_init=5).centroids
            z_test, errors = embed(model, X_test, with_reconstruction_error=True)
            scores = score_embeddings(z_test, torch.as_tensor(centroids)).score
            aucs["l2" if l2 else "no_l2"] = roc_auc(is_anomaly, scores)
            if not l2:
                aucs["reconstruction"] = roc_auc(is_anomaly, errors.cpu().numpy())
        per_digit[str(digit)] = aucs
        _say(f"anomaly digit {digit}: " + ", ".join(f"{k} {v:.4f}" for k, v in aucs.items()))
    mean = {
        key: float(np.mean([row[key] for row in per_digit.values()]))
        for key in ("l2", "no_l2", "reconstruction")
    }
    return {"model": kind, "per_digit": per_digit, "mean": mean}


def _format(value: float | None) -> str:
    return "    -" if value is None else f"{value:.4f}"


def print_tables(results: dict[str, Any]) -> None:
    print(f"\nMNIST, {results['epochs']} epochs, {results['n_train']:,} training images")
    if results["clustering"]:
        print("\nClustering accuracy (k = 10)      ours    paper")
    for name, row in results["clustering"].items():
        print(f"  {name:<30}  {row['accuracy']:.4f}  {_format(PAPER_CLUSTERING_ACC[name])}")
    anomaly = results["anomaly"]
    if not anomaly:
        return
    print(f"\nAnomaly AUC, one digit anomalous, k = 9 ({anomaly['model']} AE)")
    header = "  digit   " + "  ".join(f"{k:>14}" for k in ("l2", "no_l2", "reconstruction"))
    print(header)
    for digit, row in anomaly["per_digit"].items():
        print(f"  {digit:>5}   " + "  ".join(f"{row[k]:>14.4f}" for k in row))
    print("  mean    " + "  ".join(f"{anomaly['mean'][k]:>14.4f}" for k in anomaly["mean"]))
    print(
        "  paper   "
        + "  ".join(f"{_format(PAPER_ANOMALY_MEAN_AUC[k]):>14}" for k in anomaly["mean"])
    )


def run_paper_benchmark(
    *,
    epochs: int = 2,
    json_path: str | Path | None = None,
    train_limit: int | None = None,
    digits: list[int] | None = None,
    anomaly_model: str = "conv",
    device: str = "auto",
    progress: bool = True,
    tables: tuple[str, ...] = ("clustering", "anomaly"),
) -> dict[str, Any]:
    """Run the tables, print them beside the paper's figures, optionally write JSON."""
    started = time.perf_counter()
    device_ = select_device(device)
    mnist = load_dataset("mnist")
    X = mnist.X.astype(np.float32) / 255.0
    y = mnist.y
    X_train, y_train = X[:MNIST_TRAIN], y[:MNIST_TRAIN]
    X_test, y_test = X[MNIST_TRAIN:], y[MNIST_TRAIN:]
    if train_limit is not None:
        X, y = X[:train_limit], y[:train_limit]
        X_train, y_train = X_train[:train_limit], y_train[:train_limit]
    digits = list(range(10)) if digits is None else digits
    _say(f"paper benchmark on {device_}: {len(X):,} images to cluster, digits {digits}")
    results: dict[str, Any] = {
        "epochs": epochs,
        "n_train": len(X),
        "device": str(device_),
        "clustering": {},
        "anomaly": {},
        "paper": {
            "clustering_acc": PAPER_CLUSTERING_ACC,
            "anomaly_mean_auc": PAPER_ANOMALY_MEAN_AUC,
        },
    }
    if "clustering" in tables:
        results["clustering"] = run_clustering(
            X, y, epochs=epochs, device=device_, progress=progress
        )
    if "anomaly" in tables:
        results["anomaly"] = run_anomaly(
            X_train,
            y_train,
            X_test,
            y_test,
            digits=digits,
            kind=anomaly_model,
            epochs=epochs,
            device=device_,
            progress=progress,
        )
    results["seconds"] = time.perf_counter() - started
    print_tables(results)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {json_path}")
    return results

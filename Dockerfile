# syntax=docker/dockerfile:1
#
# stream-l2ae: one image for the scoring daemon (`stream-l2ae serve`, the default command) and the
# retraining job (`stream-l2ae retrain`, deploy/kubernetes/trainer-cronjob.yaml).
#
#   docker build -t stream-l2ae:0.1.0 .
#   docker run --rm -v models:/models \
#       -e STREAM_L2AE_KAFKA__BOOTSTRAP_SERVERS=broker:9092 -p 9108:9108 stream-l2ae:0.1.0
#   docker run --rm -v models:/models stream-l2ae:0.1.0 retrain --config /etc/stream-l2ae/config.toml
#
# Build arguments:
#   BASE_IMAGE      the base image; python:3.11-slim by default. For the GPU trainer, a CUDA
#                   runtime image that provides Python 3.11 as `python` and `pip` (Debian/Ubuntu,
#                   with groupadd/useradd), e.g. your organisation's CUDA + Python 3.11 base:
#                     docker build --build-arg BASE_IMAGE=<cuda-python3.11-image> \
#                                  -t stream-l2ae:0.1.0-cuda .
#                   The default image already trains on a GPU when one is passed through
#                   (`--gpus all`, or nvidia.com/gpu on Kubernetes): the torch wheels bring their
#                   own CUDA libraries and need only the host's NVIDIA driver.
#   TORCH_PIP_ARGS  extra pip arguments for the torch install only, e.g. the index of your
#                   mirror or of CPU-only wheels for a smaller daemon image (empty by default).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_PIP_ARGS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib

# The same uid/gid as the securityContext of deploy/kubernetes/*.yaml (runAsUser 10001).
RUN groupadd --system --gid 10001 stream-l2ae \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin stream-l2ae

# torch first, in a layer of its own: the largest dependency and the one that changes least.
# The version is the pin of pyproject.toml, so `pip install .` below keeps it.
RUN pip install ${TORCH_PIP_ARGS} torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream_l2ae ./stream_l2ae
COPY consumers ./consumers
COPY trainer ./trainer
RUN pip install . \
 && stream-l2ae --help > /dev/null \
 && rm -rf /src
WORKDIR /

# /models: the model volume (bundles, LATEST); /var/lib/stream-l2ae: the daemon's checkpoints.
# Owned by the runtime user so that fresh named volumes mounted there are writable.
RUN mkdir -p /models /var/lib/stream-l2ae /etc/stream-l2ae \
 && chown 10001:10001 /models /var/lib/stream-l2ae
COPY deploy/docker/config.toml /etc/stream-l2ae/config.toml

USER 10001:10001
WORKDIR /var/lib/stream-l2ae

# [serve] metrics_port: Prometheus metrics at /metrics.
EXPOSE 9108

ENTRYPOINT ["stream-l2ae"]
CMD ["serve", "--config", "/etc/stream-l2ae/config.toml"]

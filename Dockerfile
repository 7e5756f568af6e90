# syntax=docker/dockerfile:1
# dtrain image: the repository at /opt/dtrain, set up by launch/setup.sh (the same recipe as on a
# workstation), plus sshd so that MPIJob launchers can start horovodrun ranks in worker pods.
#
# CPU (default):
#   docker build -t dtrain:cpu .
# GPU (Horovod built with NCCL; the base needs Python 3.11+, nvcc and the NCCL headers):
#   docker build -t dtrain:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 \
#     --build-arg DTRAIN_WITH_NCCL=1 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Needs BuildKit (the default builder of Docker 23+) for the cache mount that keeps the Horovod wheel
# and pip downloads between builds.

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# 1 builds Horovod with NCCL GPU operations (CUDA base image and CUDA torch needed).
ARG DTRAIN_WITH_NCCL=0
# pip extras of dtrain installed by setup.sh (dev: the test tools too, so the suite runs in the image).
ARG DTRAIN_EXTRAS=dev
# Extra package index for torch: PyPI's Linux torch wheel pulls the CUDA libraries (gigabytes), so CPU
# images take the CPU-only wheel. Empty: PyPI only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    DTRAIN_WITH_NCCL=${DTRAIN_WITH_NCCL} \
    DTRAIN_EXTRAS=${DTRAIN_EXTRAS}

# Build tools for Horovod (g++, make, cmake 3.x from the distribution: Horovod 0.28 rejects cmake 4),
# OpenSSH server and client for the MPIJob launcher, and Python 3.11+ with venv where the base lacks it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates g++ make cmake openssh-server openssh-client procps \
    && if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    fi \
    && cmake --version | head -n 1 | grep -q 'version 3\.' \
    && rm -rf /var/lib/apt/lists/*

# sshd for passwordless root logins between pods on port 22. The mpi-operator mounts the job's key
# pair and authorized_keys into /root/.ssh from a Secret: keys only (no passwords), StrictModes off
# because Secret volumes have their own permissions, and no host-key prompts or known_hosts writes
# since pods come and go with new addresses. Host keys are generated at build time.
RUN mkdir -p /run/sshd /root/.ssh \
    && chmod 700 /root/.ssh \
    && ssh-keygen -A \
    && printf '%s\n' \
        'Port 22' \
        'PermitRootLogin prohibit-password' \
        'PubkeyAuthentication yes' \
        'PasswordAuthentication no' \
        'KbdInteractiveAuthentication no' \
        'StrictModes no' \
        > /etc/ssh/sshd_config.d/dtrain.conf \
    && printf '%s\n' \
        'Host *' \
        '    Port 22' \
        '    StrictHostKeyChecking no' \
        '    UserKnownHostsFile /dev/null' \
        '    LogLevel ERROR' \
        '    ConnectionAttempts 10' \
        > /etc/ssh/ssh_config.d/dtrain.conf \
    && grep -q '^Include /etc/ssh/sshd_config.d/' /etc/ssh/sshd_config \
    && /usr/sbin/sshd -t

WORKDIR /opt/dtrain
COPY . /opt/dtrain

# The one set-up recipe: launch/setup.sh (venv at /opt/dtrain/.venv, torch, Horovod, dtrain editable).
RUN --mount=type=cache,target=/root/.cache \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && PYTHON=python3 launch/setup.sh

ENV VIRTUAL_ENV=/opt/dtrain/.venv \
    PATH=/opt/dtrain/.venv/bin:${PATH}
# ssh sessions do not inherit the image's environment; PAM reads /etc/environment, so commands run
# over ssh find the venv too (horovodrun also exports the launcher's PATH to its ranks).
RUN echo "PATH=$PATH" > /etc/environment

EXPOSE 22 8786 8787
CMD ["dtrain", "--help"]

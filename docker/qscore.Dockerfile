# syntax=docker/dockerfile:1
# qscore: one image for the scoring API (the default command) and the job workers (compose runs
# it as `qscore worker`). PyPI's torch wheels for Linux x86_64 are CUDA builds that bring the CUDA
# libraries as wheels of their own, so no CUDA base image is needed: the same image runs on CPU,
# and on a GPU with only the driver on the host and the NVIDIA container toolkit.
#   docker build -f docker/qscore.Dockerfile -t qscore:0.1.0 .
# BASE_IMAGE: a Debian-like image with python3 (3.11 or later) and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# pip's settings for this build only (a mirror, a local wheelhouse, a constraints file); build
# arguments are not kept in the image's environment but show in its history: no credentials here.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT=60

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/qscore \
    PATH=/opt/qscore/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The user the API and the workers run as (uid 1000), and the folders of the registry volume it
# owns: an empty named volume takes the owner of the folder it is mounted on.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 1000 --user-group qscore \
    && install -d -o qscore -g qscore /var/lib/qscore /var/lib/qscore/registry /var/lib/qscore/checkpoints

WORKDIR /app
# The dependencies first, read from pyproject.toml: their layer (torch and the CUDA libraries,
# most of the image) is built again only when they change, not with every change of the code.
# The pip cache is a build cache mount: reused by the next build, never part of the image.
# triton (0.9 GB) is torch's compiler for torch.compile, which qscore does not use: eager CUDA
# and CPU kernels run without it. Install it back to use torch.compile in this image.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip uninstall -y triton \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY qscore_config ./qscore_config
COPY models ./models
COPY service ./service
COPY worker ./worker
COPY qscore_cli ./qscore_cli
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && rm -rf build ./*.egg-info

# By number (the qscore user made above): a runtime can check it is not root without the passwd file.
USER 1000:1000
ENV QSCORE_REGISTRY_ROOT=/var/lib/qscore/registry QSCORE_JOB_CHECKPOINT_DIR=/var/lib/qscore/checkpoints
# 8000: the API; 9101: a worker's metrics (QSCORE_WORKER_METRICS_PORT).
EXPOSE 8000 9101
CMD ["qscore", "serve", "--host", "0.0.0.0", "--port", "8000"]

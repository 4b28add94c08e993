# The scoring API (CPU wheels of PyTorch; use docker/worker.Dockerfile's base for a GPU API).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.14" "torchvision>=0.29"
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY worker ./worker
COPY qscore_cli ./qscore_cli
COPY qscore_config ./qscore_config
RUN pip install . && useradd --create-home --uid 1000 qscore && mkdir -p /var/lib/qscore \
    && chown qscore /var/lib/qscore

USER qscore
ENV QSCORE_REGISTRY_ROOT=/var/lib/qscore/registry
EXPOSE 8000
CMD ["qscore", "serve", "--host", "0.0.0.0", "--port", "8000"]

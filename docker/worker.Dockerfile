# A GPU job worker: one container per GPU (compose reserves the device), one task at a time.
# Jobs come from the broker (QSCORE_BROKER_URL: RabbitMQ in compose), records go to QSCORE_REDIS_URL.
FROM pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY worker ./worker
COPY qscore_cli ./qscore_cli
COPY qscore_config ./qscore_config
RUN pip install . && useradd --create-home --uid 1000 qscore && mkdir -p /var/lib/qscore \
    && chown qscore /var/lib/qscore

USER qscore
ENV QSCORE_REGISTRY_ROOT=/var/lib/qscore/registry QSCORE_DEVICE=cuda QSCORE_WORKER_METRICS_PORT=9101
EXPOSE 9101
# prefork: time limits work, and encoders load in the child only (no CUDA across the fork).
CMD ["qscore", "worker", "--concurrency", "1", "--pool", "prefork"]

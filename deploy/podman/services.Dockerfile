# syntax=docker/dockerfile:1
# Stand-ins, made from Debian's packages, for the public images of Redis, RabbitMQ, Prometheus and
# Alertmanager that docker-compose.yml pulls, for machines that cannot pull them (see
# scripts/compose-smoke.sh). Each behaves as its public image does for compose: the same command
# line works, the same data folder, a user that is not root, the tools the healthchecks call.
#   podman build -f deploy/podman/services.Dockerfile --target redis --build-arg BASE_IMAGE=... deploy/podman
# DL3008 (pin apt versions): Debian stable's own versions are meant; they get security fixes, and
# a pinned version stops building at the next point release.
# DL3066 (numeric USER): the packages make their users, with numbers assigned at install time.
# hadolint global ignore=DL3008,DL3066
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS redis
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o redis -g redis /data
COPY --chmod=0755 redis-entrypoint.sh /usr/local/bin/redis-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint.sh"]
CMD ["redis-server"]

FROM ${BASE_IMAGE} AS rabbitmq
RUN apt-get update \
    && apt-get install -y --no-install-recommends rabbitmq-server \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o rabbitmq -g rabbitmq /var/lib/rabbitmq /etc/rabbitmq/conf.d
COPY --chmod=0755 rabbitmq-entrypoint.sh /usr/local/bin/rabbitmq-entrypoint.sh
# Debian's /usr/sbin wrappers log to files and switch users; the scripts behind them run as is.
ENV PATH=/usr/lib/rabbitmq/bin:$PATH HOME=/var/lib/rabbitmq RABBITMQ_LOGS=- \
    RABBITMQ_CONFIG_FILES=/etc/rabbitmq/conf.d
USER rabbitmq
EXPOSE 5672
ENTRYPOINT ["/usr/local/bin/rabbitmq-entrypoint.sh"]
CMD ["rabbitmq-server"]

FROM ${BASE_IMAGE} AS prometheus
# wget: what the healthcheck calls (the public image has busybox's).
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o prometheus -g prometheus /prometheus /etc/prometheus
WORKDIR /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

FROM ${BASE_IMAGE} AS alertmanager
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus-alertmanager wget \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o prometheus -g prometheus /alertmanager /etc/alertmanager
WORKDIR /alertmanager
USER prometheus
EXPOSE 9093
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]

#!/bin/sh
# The public rabbitmq image's environment: RABBITMQ_DEFAULT_USER, _PASS and _VHOST make the user
# and virtual host of a new node (written as rabbitmq.conf settings, which RabbitMQ 3.10 reads).
set -eu
conf=/etc/rabbitmq/conf.d/10-defaults.conf
: > "$conf"
[ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user = $RABBITMQ_DEFAULT_USER" >> "$conf"
[ -n "${RABBITMQ_DEFAULT_PASS:-}" ] && echo "default_pass = $RABBITMQ_DEFAULT_PASS" >> "$conf"
[ -n "${RABBITMQ_DEFAULT_VHOST:-}" ] && echo "default_vhost = $RABBITMQ_DEFAULT_VHOST" >> "$conf"
# Debian's 3.10 ignores the queue argument x-consumer-timeout that the workers set (3.12 and later
# honour it): its consumer_timeout goes above the longest job instead (7 h, as the README says).
echo "consumer_timeout = 25200000" >> "$conf"
exec "$@"

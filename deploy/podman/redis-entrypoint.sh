#!/bin/sh
# The public redis image is built with protected mode off (it listens on the container's network,
# where other containers connect); Debian's redis-server has it on, which refuses them.
set -e
if [ "${1:-}" = "redis-server" ]; then
  set -- "$@" --protected-mode no
fi
exec "$@"

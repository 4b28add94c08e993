#!/usr/bin/env bash
# docker-compose.yml end to end, with podman: builds the images, starts the stack, waits for every
# healthcheck, then checks it through the published ports (scripts/compose_smoke_checks.py):
# POST /score with CIFAR-10 JPEGs, a discover job on the worker container, Prometheus scraping the
# API and the worker with the alert rules loaded, and a restart of the worker container mid-job
# that the job survives. Tears everything down at the end, also on failure; prints what it did
# with timings. Not part of ./scripts/test.sh (CI runs it only with QSCORE_COMPOSE_SMOKE=1).
#
# On a machine that cannot pull public images (this one), the override
# deploy/podman/compose.podman.yml replaces Redis, RabbitMQ, Prometheus and Alertmanager by
# stand-ins built from Debian's packages (deploy/podman/services.Dockerfile), leaves Grafana out
# and the GPU reservation. The base image of all of them is Debian bookworm with python3, made
# with debootstrap and kept (an image in podman's storage, its tree in the cache folder).
#
# Environment:
#   QSCORE_SMOKE_BASE_IMAGE   base of the qscore image; default: the debootstrap-made one. On a
#                             machine that pulls, python:3.11-slim-bookworm (the Dockerfile's own).
#   QSCORE_SMOKE_CACHE        cache folder (default ~/.cache/qscore-compose-smoke): base tree,
#                             podman-compose, podman's configuration.
#   QSCORE_SMOKE_KEEP=1       leave the stack running (for a look around); `down` it yourself.
# Needs root (podman without rootless setup; apt-get installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${QSCORE_SMOKE_CACHE:-$HOME/.cache/qscore-compose-smoke}
PROJECT=qscore-smoke
IMAGE=qscore:0.1.0                       # docker-compose.yml's image of the API and the workers
STANDIN=localhost/qscore-smoke           # prefix of the stand-ins, as in the override
DEBIAN_BASE=$STANDIN/debian-python:bookworm
PODMAN_COMPOSE_VERSION=1.6.0             # !reset tags, profiles; as in pyproject's dev extras
mkdir -p "$CACHE"
WORK=$(mktemp -d /tmp/qscore-compose-smoke.XXXXXX)

T0=$(date +%s)
TIMINGS=()
step_started=0
step() { step_started=$(date +%s); echo "== $*"; }
done_step() { TIMINGS+=("$(printf '%5d s  %s' $(($(date +%s) - step_started)) "$1")"); }

report() {
  echo
  echo "== compose smoke: $1 after $(($(date +%s) - T0)) s"
  printf '%s\n' "${TIMINGS[@]}"
}

# -- tools ------------------------------------------------------------------------------------
step "tools: podman, runc, netavark, aardvark-dns, debootstrap, podman-compose"
need=()
for pair in podman:podman runc:runc debootstrap:debootstrap iptables:iptables \
            /usr/lib/podman/netavark:netavark /usr/lib/podman/aardvark-dns:aardvark-dns; do
  tool=${pair%%:*} package=${pair##*:}
  if [[ $tool == /* ]]; then [ -x "$tool" ] || need+=("$package"); else command -v "$tool" >/dev/null || need+=("$package"); fi
done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "error: missing ${need[*]}; run as root to install them" >&2; exit 1; }
  apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; }
fi
if ! "$CACHE/tools/bin/podman-compose" --version 2>/dev/null | grep -q "$PODMAN_COMPOSE_VERSION"; then
  python3 -m venv "$CACHE/tools"
  "$CACHE/tools/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION" "httpx>=0.27" >"$CACHE/tools.log" 2>&1 \
    || { cat "$CACHE/tools.log" >&2; exit 1; }
fi
# crun (podman's default) refuses this machine's hybrid cgroups; runc works with cgroupfs (no
# systemd here). No default ulimits: the ones podman sets are above what this machine allows.
cat > "$CACHE/containers.conf" <<'EOF'
[containers]
default_ulimits = []
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$CACHE/containers.conf
PODMAN=(nice -n 10 podman)
COMPOSE=("$CACHE/tools/bin/podman-compose" -p "$PROJECT" -f docker-compose.yml -f deploy/podman/compose.podman.yml)
podman --version
done_step "tools ($(podman --version | cut -d' ' -f3), podman-compose $PODMAN_COMPOSE_VERSION, runc $(runc --version | head -1 | cut -d' ' -f3))"

# -- teardown (also on failure) ---------------------------------------------------------------
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" != 0 ] && [ -n "$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" -q)" ]; then
    echo "== failed (exit $rc): the last log lines of each container"
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      echo "--- $c ($(podman inspect "$c" --format '{{.State.Status}}'))"
      podman logs --tail 30 "$c" 2>&1 | sed 's/^/    /'
    done
  fi
  if [ "${QSCORE_SMOKE_KEEP:-0}" = 1 ] && [ "$rc" = 0 ]; then
    echo "== left running (QSCORE_SMOKE_KEEP=1): ${COMPOSE[*]} down -v"
  else
    step "teardown: containers, network, volumes"
    "${COMPOSE[@]}" down -v -t 5 >/dev/null 2>&1 || true
    done_step "teardown"
  fi
  rm -rf "$WORK"
  if [ "$rc" = 0 ]; then report "passed"; else report "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM
"${COMPOSE[@]}" down -v -t 0 >/dev/null 2>&1 || true  # what a killed earlier run left

# -- base image -------------------------------------------------------------------------------
# Also the base of the stand-ins, whatever the base of the qscore image.
BASE_IMAGE=${QSCORE_SMOKE_BASE_IMAGE:-$DEBIAN_BASE}
if ! podman image exists "$DEBIAN_BASE"; then
  step "base image: Debian bookworm with python3 (debootstrap)"
  if [ ! -f "$CACHE/debian-python-bookworm.tar" ]; then
    rm -rf "$CACHE/rootfs"
    nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$CACHE/rootfs" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # This machine's CA bundle: pip and apt inside the builds reach the registries the way the
    # host does (through its TLS proxy).
    cp /etc/ssl/certs/ca-certificates.crt "$CACHE/rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$CACHE"/rootfs/var/cache/apt/archives/*.deb "$CACHE"/rootfs/var/lib/apt/lists/*
    tar -C "$CACHE/rootfs" -cf "$CACHE/debian-python-bookworm.tar" . && rm -rf "$CACHE/rootfs"
  fi
  podman import --quiet --change 'CMD ["/bin/bash"]' "$CACHE/debian-python-bookworm.tar" "$DEBIAN_BASE" >/dev/null
  done_step "base image $DEBIAN_BASE ($(podman image inspect "$DEBIAN_BASE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"
fi

# -- pip's settings of this machine, for the build --------------------------------------------
# The host's pip configuration (files and PIP_* variables) as build arguments, with the local
# folders and files it names mounted read-only at the same paths: the build finds the same
# wheels (here torch and the CUDA libraries lie on disk: nothing is downloaded twice). Only the
# settings the Dockerfile declares pass.
PIP_ARGS=()
declare -A mounted=()
mount_ro() {
  local path=$1
  [ -e "$path" ] && [ -z "${mounted[$path]:-}" ] || return 0
  mounted[$path]=1
  PIP_ARGS+=(--volume "$path:$path:ro")
}
declare -A pip_setting=()
while IFS= read -r line; do
  key=${line%%=*} value=${line#*=}
  value=${value#\'} value=${value%\'}
  scope=${key%%.*} name=${key#*.}
  case $name in index-url|extra-index-url|find-links|constraint|cert|default-timeout) ;; *) continue ;; esac
  # PIP_* variables (":env:") win over the configuration files, as in pip.
  if [ "$scope" = ":env:" ] || [ -z "${pip_setting[$name]:-}" ]; then pip_setting[$name]=$value; fi
done < <(python3 -m pip config list 2>/dev/null || true)
for name in "${!pip_setting[@]}"; do
  value=${pip_setting[$name]}
  var=PIP_$(echo "$name" | tr 'a-z-' 'A-Z_')
  PIP_ARGS+=(--build-arg "$var=$value")
  for item in $value; do
    path=${item#file://}
    [[ $path == /* ]] || continue
    mount_ro "$path"
    # A local index (.../simple) links to its files beside it (../files): the folder above too.
    [ "$(basename "$path")" = simple ] && mount_ro "$(dirname "$path")"
  done
done

# -- images -----------------------------------------------------------------------------------
step "image $IMAGE from docker/qscore.Dockerfile on $BASE_IMAGE"
# The pip cache of the build: a cache mount (Dockerfile) that podman keeps between builds. (Here
# it stays empty: the registry's answers carry no caching headers; the large wheels are on disk.)
previous=$(podman image inspect "$IMAGE" --format '{{.Id}}' 2>/dev/null || true)
"${PODMAN[@]}" build --network host --layers -f docker/qscore.Dockerfile -t "$IMAGE" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" "${PIP_ARGS[@]}" . >"$WORK/build-qscore.log" 2>&1 \
  || { tail -40 "$WORK/build-qscore.log" >&2; exit 1; }
# The image this build replaced (5 GB): gone, with the layers only it used.
current=$(podman image inspect "$IMAGE" --format '{{.Id}}')
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then podman rmi "$previous" >/dev/null 2>&1 || true; fi
image_size() { podman image inspect "$1" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}'; }
done_step "image $IMAGE: $(image_size "$IMAGE") ($(grep -c 'Using cache' "$WORK/build-qscore.log" || true) cached steps)"

step "stand-ins from Debian's packages: redis, rabbitmq, prometheus, alertmanager"
for target in redis rabbitmq prometheus alertmanager; do
  "${PODMAN[@]}" build --network host --layers -f deploy/podman/services.Dockerfile --target "$target" \
    -t "$STANDIN/$target:bookworm" --build-arg "BASE_IMAGE=$DEBIAN_BASE" deploy/podman \
    >"$WORK/build-$target.log" 2>&1 || { tail -40 "$WORK/build-$target.log" >&2; exit 1; }
done
sizes=$(for t in redis rabbitmq prometheus alertmanager; do printf '%s %s, ' "$t" "$(image_size "$STANDIN/$t:bookworm")"; done)
done_step "stand-ins: ${sizes%, }"
if podman image exists grafana/grafana:11.4.0; then
  echo "   (grafana/grafana:11.4.0 is here, but the override leaves Grafana out: enable its profile to run it)"
else
  echo "   Grafana skipped: no image can be made here (no public image reachable, no Debian package)"
fi

# -- data and settings ------------------------------------------------------------------------
step "data: CIFAR-10 JPEGs (20 train and 10 test images of each class) mounted as /data"
ARCHIVE=$REPO/../shared/data/cifar10-jpeg.tar.gz
mkdir -p "$WORK/data/cifar10"
if [ -f "$ARCHIVE" ]; then
  tar -xzf "$ARCHIVE" -C "$WORK/data/cifar10" --wildcards 'train/*/000?.jpg' 'train/*/001?.jpg' 'test/*/000?.jpg'
elif [ -d "${QSCORE_DATA_CACHE:-$REPO/.cache/data}/cifar10/train" ]; then
  src=${QSCORE_DATA_CACHE:-$REPO/.cache/data}/cifar10
  (cd "$src" && find train -name '00[01]?.jpg' && find test -name '000?.jpg') | while read -r f; do
    mkdir -p "$WORK/data/cifar10/$(dirname "$f")" && cp "$src/$f" "$WORK/data/cifar10/$f"
  done
else
  echo "error: no CIFAR-10 JPEGs: neither $ARCHIVE nor an extracted copy in \$QSCORE_DATA_CACHE/cifar10" >&2
  exit 1
fi
chmod -R a+rX "$WORK/data"
# The JPEGs for /score: the first test image of four classes.
mkdir -p "$WORK/score"
for c in airplane cat ship truck; do cp "$WORK/data/cifar10/test/$c/0000.jpg" "$WORK/score/$c.jpg"; done
done_step "data: $(find "$WORK/data" -name '*.jpg' | wc -l) JPEGs"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Secrets of this run only, from the environment (none is in an image or in the compose file).
QSCORE_API_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
RABBITMQ_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
QSCORE_API_PORT=$(free_port) PROMETHEUS_PORT=$(free_port) ALERTMANAGER_PORT=$(free_port) GRAFANA_PORT=$(free_port)
QSCORE_DATA_DIR=$WORK/data
export QSCORE_API_KEY RABBITMQ_PASSWORD QSCORE_API_PORT PROMETHEUS_PORT ALERTMANAGER_PORT GRAFANA_PORT QSCORE_DATA_DIR

# -- up, in the order of depends_on, each stage healthy before the next ------------------------
# podman 4.3 has no `wait --condition=healthy` (podman-compose skips those conditions) and no
# systemd here to run healthchecks on their interval: each is run here until it passes.
container() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
  --filter "label=io.podman.compose.service=$1" --format '{{.Names}}' | head -1; }
wait_healthy() {
  local deadline=$(($(date +%s) + $1)); shift
  for service in "$@"; do
    local name; name=$(container "$service")
    [ -n "$name" ] || { echo "error: no container for service $service" >&2; return 1; }
    until podman healthcheck run "$name" >/dev/null 2>&1; do
      if [ "$(podman inspect "$name" --format '{{.State.Status}}')" != running ]; then
        echo "error: $service ($name) is $(podman inspect "$name" --format '{{.State.Status}}')" >&2; return 1
      fi
      [ "$(date +%s)" -lt "$deadline" ] || { echo "error: $service not healthy in time" >&2; return 1; }
      sleep 2
    done
    echo "   $service healthy"
  done
}
up() { "${COMPOSE[@]}" up -d --no-deps "$@" >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; return 1; }; }

step "up: redis, rabbitmq"
up redis rabbitmq
wait_healthy 180 redis rabbitmq
done_step "redis, rabbitmq up and healthy"

step "up: api, worker"
up api worker
wait_healthy 300 api worker
done_step "api, worker up and healthy"

step "up: alertmanager, prometheus"
up alertmanager prometheus
wait_healthy 120 alertmanager prometheus
done_step "alertmanager, prometheus up and healthy"
podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '   {{.Names}}  {{.Status}}  {{.Ports}}'

# -- checks -----------------------------------------------------------------------------------
step "expected Q-Scores: \`qscore score\` in the image, on the same JPEGs and the demo pair"
podman run --rm --network none -v "$WORK/score:/score:ro" "$IMAGE" sh -c \
  'w=$(python -c "import models, pathlib; print(pathlib.Path(models.__file__).parent / \"weights\")");
   qscore score --model "$w/demo-encoder.safetensors" --features "$w/demo-feature-set.json" --json --device cpu /score/*.jpg' \
  >"$WORK/expected.jsonl" 2>"$WORK/expected.log" || { cat "$WORK/expected.log" >&2; exit 1; }
done_step "expected Q-Scores of $(wc -l <"$WORK/expected.jsonl") JPEGs"

step "checks through the published ports"
"$CACHE/tools/bin/python" scripts/compose_smoke_checks.py \
  --api "http://127.0.0.1:$QSCORE_API_PORT" --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" \
  --api-key "$QSCORE_API_KEY" --images "$WORK"/score/*.jpg --expected "$WORK/expected.jsonl" \
  --worker-container "$(container worker)" --podman podman
done_step "checks: /score, discover job, Prometheus, worker restart mid-job"

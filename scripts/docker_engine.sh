#!/usr/bin/env bash
# The container engine and the serving image's base, for make and the tests alike. Usage:
#   docker_engine.sh engine        start dockerd (as root) unless an engine already answers
#   docker_engine.sh base IMAGE    make IMAGE available: present, else pulled, else (Debian bases only) made here with
#                                  debootstrap from this machine's own apt sources and `docker import`ed under IMAGE
#   docker_engine.sh stop          stop the dockerd that `engine` started (nothing else)
# Every failure is one line on stderr and exit status 1. DOCKER_STATE (default build/docker-engine) holds the
# started engine's pid file and log; DOCKERD is the daemon's command (default: dockerd).
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # where Debian puts dockerd and debootstrap, and a user's PATH may not look

state=${DOCKER_STATE:-build/docker-engine}
pidfile=$state/dockerd.pid
log=$state/dockerd.log
DOCKERD_START_S=${DOCKERD_START_S:-60}

fail() {
    echo "error: $*" >&2
    exit 1
}

engine_answers() { docker info >/dev/null 2>&1; }

start_engine() {
    command -v docker >/dev/null || fail "no docker CLI: install a container engine (Debian: apt-get install docker.io)"
    engine_answers && return 0
    read -r -a dockerd <<<"${DOCKERD:-dockerd}"  # the daemon's command (and any extra flags)
    command -v "${dockerd[0]}" >/dev/null ||
        fail "no Docker engine answers and dockerd is not installed (Debian: apt-get install docker.io)"
    [ "$(id -u)" = 0 ] || fail "no Docker engine answers; start one (sudo dockerd, or Docker Desktop) and retry"
    mkdir -p "$state"
    # No iptables and no bridge: the engine then needs no NAT or firewall privileges (containers and builds use
    # --network host or none; the Makefile picks host when the engine has no bridge network).
    "${dockerd[@]}" --iptables=false --bridge=none >"$log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 "$((DOCKERD_START_S * 2))"); do
        engine_answers && { echo "started dockerd (pid $(cat "$pidfile"), log $log)"; return 0; }
        kill -0 "$(cat "$pidfile")" 2>/dev/null || break
        sleep 0.5
    done
    stop_engine >/dev/null 2>&1 || true
    fail "dockerd did not start: $(start_failure)"
}

# dockerd's own reason: its last fatal-sounding line, else its last line
start_failure() {
    grep -iE 'failed to start|unknown|invalid' "$log" | tail -n 1 | grep . || tail -n 1 "$log"
}

stop_engine() {
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$pidfile"
    echo "stopped dockerd (pid $pid)"
}

# The first URI of this machine's apt sources that serves SUITE (apt's own view, whatever file it comes from).
apt_mirror() {
    # shellcheck disable=SC2016  # $(REPO_URI) is apt's format field, not a shell expansion
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | awk -v suite="$1" '$2 == suite { print $1; exit }'
}

make_debian_base() {
    image=$1 suite=$2
    mirror=$(apt_mirror "$suite")
    [ -n "$mirror" ] || fail "$image cannot be pulled and no apt source of this machine serves $suite to make it from"
    command -v debootstrap >/dev/null ||
        fail "$image cannot be pulled and debootstrap is missing to make it (Debian: apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || fail "$image cannot be pulled; making it with debootstrap needs root"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo "making $image: debootstrap --variant=minbase $suite from $mirror"
    debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        rm -f "$rootfs.log"
        fail "debootstrap of $suite from $mirror failed; $image not made"
    }
    rm -f "$rootfs.log"
    slim "$rootfs"
    # the same apt sources as this machine (its security and updates suites too), so a build's apt-get reaches them
    rm -f "$rootfs/etc/apt/sources.list"
    cp -a /etc/apt/sources.list.d/. "$rootfs/etc/apt/sources.list.d/"
    [ ! -f /etc/apt/sources.list ] || cp /etc/apt/sources.list "$rootfs/etc/apt/"
    # imported under a temporary name first: IMAGE is tagged only once the import has succeeded
    staging="$image-incomplete-$$"
    tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$staging" >/dev/null ||
        fail "docker import of the $suite root file system failed; $image not made"
    docker tag "$staging" "$image" && docker rmi "$staging" >/dev/null
    echo "made $image ($(docker image inspect --format '{{.Size}}' "$image") bytes)"
}

# What the official Debian images leave out (debuerreotype's slimify and its apt settings): documentation, manuals,
# translations, package lists and downloaded packages; dpkg and apt are told to keep leaving them out.
slim() {
    rootfs=$1
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    echo 'Acquire::GzipIndexes "true";' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
    echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$rootfs"/usr/share/{man,info,locale,lintian}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log "$rootfs"/tmp/*
}

ensure_base() {
    image=${1:?usage: docker_engine.sh base IMAGE}
    engine_answers || fail "no Docker engine answers: make docker-engine (or start Docker) first"
    docker image inspect "$image" >/dev/null 2>&1 && return 0
    docker pull --quiet "$image" >/dev/null 2>&1 && { echo "pulled $image"; return 0; }
    case $image in
        debian:*-slim | debian:*) suite=${image#debian:} && make_debian_base "$image" "${suite%-slim}" ;;
        *) fail "$image is not present and cannot be pulled (no registry reachable?); pull or load it first" ;;
    esac
}

case ${1:-} in
    engine) start_engine ;;
    base) ensure_base "${2:-}" ;;
    stop) stop_engine ;;
    *) fail "usage: docker_engine.sh engine | base IMAGE | stop" ;;
esac

#!/usr/bin/env bash
# Installs the Debian packages of the commands in requirements/system-packages that PATH lacks: with apt-get as
# root, else through sudo (without a prompt, or with one on a terminal). Where neither works, or apt-get is
# absent, it stops with one line naming what to install. SYSTEM_PACKAGES names another list (the tests use it).
set -euo pipefail
list="${SYSTEM_PACKAGES:-${0%/*}/../requirements/system-packages}"

commands=() packages=()
while read -r command package _; do
    [[ -z "$command" || "$command" == \#* ]] && continue
    command -v "$command" >/dev/null && continue
    commands+=("$command")
    [[ " ${packages[*]} " == *" $package "* ]] || packages+=("$package")
done <"$list"
[ ${#commands[@]} -eq 0 ] && exit 0

needs="the tests need ${commands[*]} (Debian: ${packages[*]})"
if ! command -v apt-get >/dev/null; then
    echo "error: $needs: install them with your system's package manager and put them on PATH" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ]; then
    as_root=()
elif command -v sudo >/dev/null && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
    as_root=(sudo)
else
    echo "error: $needs: run \`apt-get install ${packages[*]}\` as root (or \`make system-deps\` as root)" >&2
    exit 1
fi
# another apt-get may hold the dpkg lock (unattended upgrades, a parallel job): wait for it rather than fail
apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600)
if ! { "${apt[@]}" update >/dev/null && "${apt[@]}" install -y --no-install-recommends "${packages[@]}" >/dev/null; }; then
    echo "error: $needs, and apt-get could not install them (its own error is above)" >&2
    exit 1
fi
for command in "${commands[@]}"; do
    command -v "$command" >/dev/null || {
        echo "error: apt-get installed ${packages[*]}, but PATH still lacks $command" >&2
        exit 1
    }
done
echo "installed ${packages[*]} (for ${commands[*]})"

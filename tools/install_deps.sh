#!/usr/bin/env bash
# Installs what canopy needs on Debian 12 (as root, or with sudo), only what is missing, and a
# Python virtual environment in .venv for the tools/ scripts. Sourced by run.sh and test.sh.
set -euo pipefail

CANOPY_DEBS=(build-essential cmake pkg-config git python3 python3-venv python3-pip
             libcmocka-dev libcjson-dev libpcre2-dev libxxhash-dev libopenblas-dev libutf8proc-dev)

canopy_install_debs() {
  local missing=()
  for p in "${CANOPY_DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "canopy: installing ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The converter needs gguf + numpy; a venv keeps them off Debian's externally managed python.
canopy_python() {
  local root="$1"
  if [ ! -x "$root/.venv/bin/python" ]; then
    python3 -m venv "$root/.venv"
  fi
  if ! "$root/.venv/bin/python" -c "import gguf, numpy, tqdm" 2>/dev/null; then
    "$root/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/tools/requirements.txt"
  fi
  echo "$root/.venv/bin/python"
}

canopy_build() {
  local root="$1" dir="$2"; shift 2
  cmake -S "$root" -B "$dir" "$@" >/dev/null
  cmake --build "$dir" -j"$(nproc)"
}

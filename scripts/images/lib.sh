# Shared by the image scripts (sourced). Everything built here is cached per
# machine outside the clone, under $AIMODEL_CACHE_DIR (default ~/.cache/aimodel),
# and images are reused by tag: a second run builds nothing.
set -euo pipefail
IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
. "$IMAGES_DIR/versions.env"
CACHE_DIR="${AIMODEL_CACHE_DIR:-$HOME/.cache/aimodel}"
mkdir -p "$CACHE_DIR"

log() { echo "== $*" >&2; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# Holds an exclusive lock on $CACHE_DIR/NAME.lock until this (sub)shell exits:
# test processes run in parallel, and one of them builds while the others wait.
lock() { local fd; exec {fd}>"$CACHE_DIR/$1.lock"; flock "$fd"; }

# Runs "$@" as root (apt-get), with sudo when not root.
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# A venv of build tools from PyPI (cmake, ninja, numpy and pyyaml for gguf-py),
# created once; prints its python.
tools_python() {
  local venv="$CACHE_DIR/tools-venv" want="cmake ninja numpy pyyaml tqdm"
  lock tools
  if ! [ -x "$venv/bin/python" ] || [ "$(cat "$venv/.packages" 2>/dev/null)" != "$want" ]; then
    log "build tools from PyPI ($want) into $venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q --disable-pip-version-check $want
    echo "$want" >"$venv/.packages"
  fi
  echo "$venv/bin/python"
}

# The llama-cpp-python sdist (it carries llama.cpp under vendor/llama.cpp),
# downloaded once with pip and unpacked once; prints the llama.cpp tree.
llama_cpp_tree() {
  local v="$LLAMA_CPP_PYTHON_VERSION" dl="$CACHE_DIR/sdist" src="$CACHE_DIR/src/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
  local sdist="$dl/llama_cpp_python-$v.tar.gz"
  lock sdist
  if ! [ -f "$sdist" ]; then
    log "downloading the llama-cpp-python $v sdist from PyPI"
    mkdir -p "$dl"
    # Only this package from source: its build backend's own dependencies come as wheels.
    python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
      -d "$dl" "llama-cpp-python==$v" >&2
  fi
  if ! [ -f "$src/.unpacked" ]; then
    log "unpacking $sdist"
    rm -rf "$src" && mkdir -p "$src"
    tar xzf "$sdist" -C "$src" --strip-components=1
    touch "$src/.unpacked"
  fi
  echo "$src/vendor/llama.cpp"
}

# docker build with a context directory, legacy builder (no BuildKit needed).
build_image() {
  local tag="$1" ctx="$2"
  DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" 2>&1 >/dev/null | grep -v -e DEPRECATED -e BuildKit -e "environment-variable" -e "^$" >&2 || true
  image_exists "$tag"
}

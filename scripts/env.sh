# shellcheck shell=bash
# Sourced by scripts/demo.sh, scripts/test.sh and the benches: makes sure the project venv
# (PyPI torch==2.11.0, whose libtorch tch 0.24 links against) exists in the per-user cache,
# creating it on first use, and exports what the build and the tests need.
#
#   WEAVER_CACHE   where venvs live (default: $XDG_CACHE_HOME/weaver or ~/.cache/weaver)
#   WEAVER_VENV    use this venv instead (must hold torch 2.11.0)

WEAVER_TORCH_VERSION=2.11.0
WEAVER_CACHE=${WEAVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weaver}
WEAVER_VENV=${WEAVER_VENV:-$WEAVER_CACHE/venv-torch-$WEAVER_TORCH_VERSION}

weaver_ensure_venv() {
  if [ -f "$WEAVER_VENV/.weaver-ready" ]; then
    return 0
  fi
  mkdir -p "$WEAVER_CACHE"
  (
    # One creator at a time: a second clone or CI job waits here instead of racing.
    flock 9
    if [ -f "$WEAVER_VENV/.weaver-ready" ]; then exit 0; fi
    echo "weaver: creating the project venv with torch==$WEAVER_TORCH_VERSION in $WEAVER_VENV (about 4.6 GB, once per machine)" >&2
    rm -rf "$WEAVER_VENV"
    python3 -m venv "$WEAVER_VENV" || exit 1
    "$WEAVER_VENV/bin/python" -m pip install --quiet --upgrade pip || exit 1
    "$WEAVER_VENV/bin/python" -m pip install --quiet "torch==$WEAVER_TORCH_VERSION" numpy safetensors || exit 1
    touch "$WEAVER_VENV/.weaver-ready"
  ) 9>"$WEAVER_CACHE/.venv.lock"
}

# Packages the tests and benches use next to torch, pinned to releases made for torch
# 2.11.0 (torchvision 0.26.0 requires exactly torch==2.11.0). Installed into an existing venv
# when this list changes (its own marker), with torch pinned so that pip can never replace it.
WEAVER_VENV_EXTRAS="torchvision==0.26.0 open-clip-torch==3.3.0 webdataset==1.0.2 prometheus_client==0.26.0 tensorboard==2.21.0 pillow kubernetes-validate==1.37.0"

weaver_ensure_extras() {
  local marker
  marker="$WEAVER_VENV/.weaver-extras-$(echo "$WEAVER_VENV_EXTRAS" | cksum | cut -d' ' -f1)"
  if [ -f "$marker" ]; then
    return 0
  fi
  (
    flock 9
    if [ -f "$marker" ]; then exit 0; fi
    echo "weaver: installing $WEAVER_VENV_EXTRAS into $WEAVER_VENV" >&2
    # shellcheck disable=SC2086
    "$WEAVER_VENV/bin/python" -m pip install --quiet "torch==$WEAVER_TORCH_VERSION" $WEAVER_VENV_EXTRAS || exit 1
    "$WEAVER_VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$WEAVER_TORCH_VERSION' else 1)" || {
      echo "weaver: installing the extras changed torch; expected $WEAVER_TORCH_VERSION" >&2
      exit 1
    }
    touch "$marker"
  ) 9>"$WEAVER_CACHE/.venv.lock"
}

weaver_ensure_venv || { echo "weaver: could not create the venv in $WEAVER_VENV" >&2; return 1 2>/dev/null || exit 1; }
weaver_ensure_extras || { echo "weaver: could not install the extra packages into $WEAVER_VENV" >&2; return 1 2>/dev/null || exit 1; }

# torch-sys asks `python` (when VIRTUAL_ENV is set) where torch's headers and libraries are.
export VIRTUAL_ENV="$WEAVER_VENV"
export PATH="$WEAVER_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export WEAVER_PYTHON="$WEAVER_VENV/bin/python"

#!/usr/bin/env bash
# Installs the SLURM and MUNGE daemons and clients that tests/slurm.rs starts on loopback
# (Debian's slurm-wlm and munge: munged, slurmctld, slurmd, sbatch, scancel, scontrol,
# sinfo). Idempotent: does nothing, fast, when they are installed. Needs root (or sudo) and
# apt-get; fails loudly, naming the reason, when it cannot install them, so that CI never
# passes the SLURM test by skipping it.
#
#   scripts/install-slurm.sh     # called by scripts/test.sh
#
# Nothing is started or enabled here: the test writes its own slurm.conf and munge key into
# a temporary directory and runs the daemons as its child processes.
set -euo pipefail

NEEDED=(munged slurmctld slurmd sbatch scancel scontrol sinfo)

missing() {
  local m=()
  for c in "${NEEDED[@]}"; do
    # The daemons live in /usr/sbin, which a non-root PATH may lack.
    command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || m+=("$c")
  done
  echo "${m[*]}"
}

MISSING=$(missing)
[ -z "$MISSING" ] && exit 0

echo "install-slurm.sh: installing slurm-wlm and munge (missing: $MISSING)" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-slurm.sh: FAILED: no apt-get on this machine; install SLURM (slurmctld, slurmd, clients) and MUNGE by hand — tests/slurm.rs needs: $MISSING" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install-slurm.sh: FAILED: installing slurm-wlm and munge needs root (run as root, or with password-less sudo) — tests/slurm.rs needs: $MISSING" >&2
    exit 1
  fi
fi
# Whatever services the packages' scripts start or fail to start (a container has no init)
# do not matter: the test runs its own daemons, on its own socket and ports.
export DEBIAN_FRONTEND=noninteractive
if ! { "${SUDO[@]}" apt-get update -q >&2 &&
       "${SUDO[@]}" apt-get install -y -q --no-install-recommends slurm-wlm munge >&2; }; then
  echo "install-slurm.sh: FAILED: apt-get could not install slurm-wlm and munge (see its output above) — tests/slurm.rs needs: $MISSING" >&2
  exit 1
fi
MISSING=$(missing)
if [ -n "$MISSING" ]; then
  echo "install-slurm.sh: FAILED: slurm-wlm and munge are installed but these are still missing: $MISSING" >&2
  exit 1
fi
echo "install-slurm.sh: installed $(/usr/sbin/slurmctld -V 2>&1) and $(/usr/sbin/munged -V 2>&1 | head -1)" >&2

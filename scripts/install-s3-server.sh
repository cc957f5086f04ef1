#!/usr/bin/env bash
# Installs the S3-protocol server that weaver-checkpoint's S3 tests start on loopback
# (s3s-fs 0.14.1, which refuses a second create-only put: `If-None-Match: *` on PutObject
# and CompleteMultipartUpload answers 412). Idempotent: does nothing when it is installed.
#
#   scripts/install-s3-server.sh            # installs if missing; prints `export WEAVER_S3_SERVER=PATH`
#   eval "$(scripts/install-s3-server.sh)"  # ... and so exports it into the calling shell
#
# weaver-checkpoint's S3 tests (checkpoint/tests/s3.rs) start that binary on 127.0.0.1 and
# fail with instructions when WEAVER_S3_SERVER is unset.
#
# Installs into $WEAVER_CACHE/bin (default ~/.cache/weaver/bin), next to the project venv.
# Needs cargo and crates.io; builds in a few minutes, once per machine.
set -euo pipefail

S3S_FS_VERSION=0.14.1
WEAVER_CACHE=${WEAVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weaver}
ROOT="$WEAVER_CACHE/s3s-fs-$S3S_FS_VERSION"
BIN="$ROOT/bin/s3s-fs"

if [ ! -x "$BIN" ]; then
  mkdir -p "$WEAVER_CACHE"
  (
    # One installer at a time; a second caller waits, then finds it installed.
    flock 9
    if [ ! -x "$BIN" ]; then
      echo "weaver: installing s3s-fs $S3S_FS_VERSION into $ROOT (once per machine)" >&2
      # Its own target dir, so that the workspace's build cache is not disturbed.
      CARGO_TARGET_DIR="$WEAVER_CACHE/s3s-fs-build" \
        cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --root "$ROOT" >&2
      rm -rf "$WEAVER_CACHE/s3s-fs-build"
    fi
  ) 9>"$WEAVER_CACHE/.s3s-fs.lock"
fi

echo "export WEAVER_S3_SERVER=$BIN"

#!/usr/bin/env bash
# weaver over SSH: the coordinator on this machine (or the first host), workers started on
# every host of a hosts file.
#
#   launch/scripts/ssh.sh HOSTS_FILE CONFIG.toml [--set section.key=value ...]
#
# HOSTS_FILE has one host a line, optionally followed by its worker count (default: the
# host's GPU count from nvidia-smi, else 1); `#` starts a comment:
#
#   gpu-node-1 8
#   gpu-node-2 8
#
# Environment knobs:
#   WEAVER_BIN          weaver on the remote hosts        (default: weaver on their PATH)
#   WEAVER_LOCAL_BIN    weaver here                       (default: $WEAVER_BIN)
#   WEAVER_PORT         coordinator port                  (default: 29400)
#   WEAVER_ADVERTISE    address workers use to reach the coordinator (default: this host's
#                       name as `hostname -f` reports it)
#   WEAVER_RUN_DIR      local run directory               (default: runs/ssh-<time>)
#   WEAVER_DEVICE       cuda (worker K uses cuda:K) or cpu (default: cuda)
#   SSH_OPTS            extra ssh options
#
# The job token is generated here (mode 0600) and copied to each host over ssh's stdin into
# a 0600 file; it never appears on a command line, in a process list or in a log. Ctrl-C
# stops the coordinator, which tells every worker to stop; stragglers are killed.

set -euo pipefail

HOSTS_FILE=${1:?usage: ssh.sh HOSTS_FILE CONFIG.toml [--set section.key=value ...]}
CONFIG=${2:?usage: ssh.sh HOSTS_FILE CONFIG.toml [--set section.key=value ...]}
shift 2
WEAVER_BIN=${WEAVER_BIN:-weaver}
WEAVER_LOCAL_BIN=${WEAVER_LOCAL_BIN:-$WEAVER_BIN}
WEAVER_PORT=${WEAVER_PORT:-29400}
WEAVER_ADVERTISE=${WEAVER_ADVERTISE:-$(hostname -f)}
WEAVER_RUN_DIR=${WEAVER_RUN_DIR:-runs/ssh-$(date +%Y%m%d-%H%M%S)}
WEAVER_DEVICE=${WEAVER_DEVICE:-cuda}
read -r -a SSH <<<"ssh -o BatchMode=yes ${SSH_OPTS:-}"

mkdir -p "$WEAVER_RUN_DIR"
umask 077
TOKEN_FILE="$WEAVER_RUN_DIR/token"
REMOTE_TOKEN=".weaver-token-$$"
URL="http://${WEAVER_ADVERTISE}:${WEAVER_PORT}"

HOSTS=()
COUNTS=()
while read -r host count _; do
  host=${host%%#*}
  [ -z "$host" ] && continue
  if [ -z "${count:-}" ] || [[ "$count" == \#* ]]; then
    count=$("${SSH[@]}" "$host" 'nvidia-smi -L 2>/dev/null | wc -l' || echo 0)
    [ "$count" -gt 0 ] || count=1
  fi
  HOSTS+=("$host")
  COUNTS+=("$count")
done <"$HOSTS_FILE"
[ "${#HOSTS[@]}" -gt 0 ] || { echo "ssh.sh: no hosts in $HOSTS_FILE" >&2; exit 1; }

# 1. The coordinator, here. It generates the token file before it serves.
"$WEAVER_LOCAL_BIN" coordinator --config "$CONFIG" "$@" \
  --listen "0.0.0.0:${WEAVER_PORT}" --token-file "$TOKEN_FILE" --run-dir "$WEAVER_RUN_DIR" \
  > >(tee "$WEAVER_RUN_DIR/coordinator.log") 2>&1 &
COORDINATOR_PID=$!
for _ in $(seq 1 60); do
  [ -s "$TOKEN_FILE" ] && break
  kill -0 "$COORDINATOR_PID" 2>/dev/null || { echo "ssh.sh: the coordinator exited early" >&2; exit 1; }
  sleep 1
done
[ -s "$TOKEN_FILE" ] || { echo "ssh.sh: no token file after 60 s" >&2; exit 1; }

# 2. Workers: on each host, copy the token (stdin → 0600 file), then start COUNT workers
#    and wait for them. Each ssh session runs until its workers exit.
REMOTE_PIDS=".weaver-pids-$$"
cleanup() {
  trap - INT TERM EXIT
  kill "$COORDINATOR_PID" 2>/dev/null || true
  # The coordinator tells workers to stop; give them a moment, then end what is left,
  # by the process ids each host recorded.
  sleep 5
  for host in "${HOSTS[@]}"; do
    "${SSH[@]}" "$host" "[ -f $REMOTE_PIDS ] && kill \$(cat $REMOTE_PIDS) 2>/dev/null; rm -f $REMOTE_PIDS $REMOTE_TOKEN" 2>/dev/null || true
  done
  # shellcheck disable=SC2046
  kill $(jobs -p) 2>/dev/null || true
}
trap cleanup INT TERM

for i in "${!HOSTS[@]}"; do
  host=${HOSTS[$i]}
  n=${COUNTS[$i]}
  "${SSH[@]}" "$host" "umask 077; cat > $REMOTE_TOKEN" <"$TOKEN_FILE"
  # Runs in the remote login shell (POSIX sh): start n workers, record their pids, wait.
  "${SSH[@]}" "$host" "
    threads=\$(( \$(nproc) / $n )); [ \$threads -gt 0 ] || threads=1
    pids=''
    k=0
    while [ \$k -lt $n ]; do
      if [ '$WEAVER_DEVICE' = cuda ]; then dev=cuda:\$k; else dev=cpu; fi
      WEAVER_LOCAL_RANK=\$k WEAVER_LOCAL_WORLD_SIZE=$n WEAVER_NUM_THREADS=\$threads \
        $WEAVER_BIN worker --coordinator $URL --token-file $REMOTE_TOKEN --device \$dev 2>&1 &
      pids=\"\$pids \$!\"
      k=\$((k + 1))
    done
    echo \$pids > $REMOTE_PIDS
    status=0
    for p in \$pids; do wait \$p || status=1; done
    rm -f $REMOTE_TOKEN $REMOTE_PIDS
    exit \$status
  " 2>&1 | sed -u "s/^/[$host] /" &
done

# 3. The result is the coordinator's exit status.
set +e
wait "$COORDINATOR_PID"
STATUS=$?
# Workers exit when the coordinator tells them to stop; wait for the ssh sessions, but not
# forever.
for _ in $(seq 1 30); do
  [ -z "$(jobs -rp)" ] && break
  sleep 1
done
[ -z "$(jobs -rp)" ] || cleanup
trap - INT TERM
echo "ssh.sh: coordinator exited with status $STATUS (metrics: $WEAVER_RUN_DIR/metrics.jsonl)"
exit "$STATUS"

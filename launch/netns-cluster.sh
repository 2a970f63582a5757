#!/usr/bin/env bash
# A cluster in a box: H "hosts" on this machine, each a Linux network namespace with its own
# address, joined by a switch (a bridge in one more namespace), running one distnn job with
# torchrun's c10d rendezvous across them. Needs root and iproute2; nothing else.
#
#   launch/netns-cluster.sh [--hosts H] [--procs P] [--rate RATE] [--port PORT]
#                           [--timeout S] [--rdzv-id ID] -- [distnn.train flags]
#   launch/netns-cluster.sh --check      # build and tear down a 2-host cluster; exit 0 if it works
#
#   --hosts H     hosts (namespaces), 1 to 8 (default 2); host i has address 10.77.0.(i+1)/24
#   --procs P     ranks per host (torchrun --nproc_per_node, default 1)
#   --rate RATE   shape every host's link with tc tbf, both directions, to RATE in tc's syntax
#                 (200mbit, 1gbit, ...); default: unshaped (veth speed)
#   --port PORT   the rendezvous port on host 0 (default 29400)
#   --timeout S   kill the job after S seconds (default 0: no limit)
#
# Example: launch/netns-cluster.sh --hosts 3 --procs 1 --rate 200mbit -- --steps 200 --log-every 0
#
# Each host's output (stdout and stderr; rank 0's summary is in host 0's) is printed after the
# job, under a "== host i ... ==" line. Exit code: 0 when every host succeeded, 1 when any failed,
# 2 when the cluster cannot be built (not root, no `ip netns`, a namespace cannot be made) or a
# flag is wrong. The namespaces are named distnn-PID-*, so parallel runs do not collide (each
# cluster's addresses live only inside its own namespaces); they are deleted on every exit,
# Ctrl-C included, after killing every process inside them. Leftovers of a run whose PID is gone
# (after SIGKILL) are deleted by the next run.
#
# All hosts share this machine's cores: OMP_NUM_THREADS defaults to 1 for every rank. The
# torchrun is $TORCHRUN, else the one beside $PYTHON, else `torchrun` on PATH; this checkout is
# put first on PYTHONPATH. GLOO_SOCKET_IFNAME is each host's interface, and
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see launch/torchrun-multinode.sh). `is_host` and
# `--local-addr` are required: the namespaces share one hostname, which resolves to loopback.
set -uo pipefail

die() { echo "netns-cluster: $*" >&2; exit 2; }

HOSTS=2 PROCS=1 RATE="" PORT=29400 TIMEOUT=0 RDZV_ID="netns-$$" CHECK=0
while (($#)); do
  case "$1" in
    --hosts) HOSTS="${2:-}"; shift 2 || die "--hosts needs a value" ;;
    --procs) PROCS="${2:-}"; shift 2 || die "--procs needs a value" ;;
    --rate) RATE="${2:-}"; shift 2 || die "--rate needs a value" ;;
    --port) PORT="${2:-}"; shift 2 || die "--port needs a value" ;;
    --timeout) TIMEOUT="${2:-}"; shift 2 || die "--timeout needs a value" ;;
    --rdzv-id) RDZV_ID="${2:-}"; shift 2 || die "--rdzv-id needs a value" ;;
    --check) CHECK=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (distnn flags go after --)" ;;
  esac
done
[[ "$HOSTS" =~ ^[1-8]$ ]] || die "--hosts must be 1 to 8, got '$HOSTS'"
[[ "$PROCS" =~ ^[1-9][0-9]*$ ]] || die "--procs must be a positive integer, got '$PROCS'"
[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT >= 1 && PORT <= 65535)) || die "--port must be 1 to 65535, got '$PORT'"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds, got '$TIMEOUT'"
[[ -z "$RATE" || "$RATE" =~ ^[0-9]+(\.[0-9]+)?([kmgt]?(bit|bps))$ ]] \
  || die "--rate must be tc's syntax such as 200mbit or 1gbit, got '$RATE'"

((EUID == 0)) || die "needs root to create network namespaces (running as uid $EUID)"
command -v ip >/dev/null || die "'ip' (iproute2) is not installed"
ip netns list >/dev/null 2>&1 || die "'ip netns' is not available here"
[[ -z "$RATE" ]] || command -v tc >/dev/null || die "--rate needs 'tc' (iproute2), not installed"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="distnn-$$"
SWITCH="$PREFIX-sw"
SUBNET="10.77.0"
LOGDIR=""
NAMESPACES=()
AGENTS=()

kill_inside() {  # every process in the namespaces made here (torchrun's ranks are session leaders)
  local ns pids
  for ns in "$@"; do
    pids="$(ip netns pids "$ns" 2>/dev/null)"
    # shellcheck disable=SC2086
    [[ -z "$pids" ]] || kill -"${SIG:-TERM}" $pids 2>/dev/null
  done
}

teardown() {
  trap - EXIT INT TERM
  local ns
  if ((${#NAMESPACES[@]})); then
    kill_inside "${NAMESPACES[@]}"
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      [[ -z "$(for ns in "${NAMESPACES[@]}"; do ip netns pids "$ns" 2>/dev/null; done)" ]] && break
      sleep 0.2
    done
    SIG=KILL kill_inside "${NAMESPACES[@]}"
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null; done
  fi
  [[ -z "$LOGDIR" ]] || rm -rf "$LOGDIR"
}
trap 'teardown' EXIT
trap 'echo "netns-cluster: interrupted, tearing down" >&2; teardown; exit 130' INT
trap 'echo "netns-cluster: terminated, tearing down" >&2; teardown; exit 143' TERM

remove_stale() {  # namespaces of earlier runs whose process is gone (SIGKILLed)
  local ns pid
  while read -r ns _; do
    [[ "$ns" =~ ^distnn-([0-9]+)- ]] || continue
    pid="${BASH_REMATCH[1]}"
    kill -0 "$pid" 2>/dev/null && continue
    SIG=KILL kill_inside "$ns"
    ip netns del "$ns" 2>/dev/null
  done < <(ip netns list 2>/dev/null)
}

shape() {  # shape() NAMESPACE DEVICE: tbf at $RATE on the device's egress
  [[ -n "$RATE" ]] || return 0
  # The bucket holds 1 ms at the rate, at least 64 KiB (FACTS.md's 200mbit recipe used 64kb).
  local burst
  burst="$(awk -v r="$RATE" 'BEGIN { n = r + 0; u = tolower(r); sub(/^[0-9.]+/, "", u);
    m = (u ~ /^k/) ? 1e3 : (u ~ /^m/) ? 1e6 : (u ~ /^g/) ? 1e9 : (u ~ /^t/) ? 1e12 : 1;
    bytes = n * m / ((u ~ /bps$/) ? 1 : 8) / 1000; if (bytes < 65536) bytes = 65536;
    printf "%d", bytes }')"
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst "$burst" latency 50ms
}

build() {
  remove_stale
  ip netns add "$SWITCH" || die "cannot create a network namespace ('ip netns add' failed)"
  NAMESPACES+=("$SWITCH")
  ip -n "$SWITCH" link add br0 type bridge || die "cannot create a bridge"
  ip -n "$SWITCH" link set br0 up || die "cannot bring the bridge up"
  local i ns
  for ((i = 0; i < HOSTS; i++)); do
    ns="$PREFIX-h$i"
    ip netns add "$ns" || die "cannot create network namespace $ns"
    NAMESPACES+=("$ns")
    # Created inside the switch namespace, so no name is ever taken in the root namespace.
    ip -n "$SWITCH" link add "port$i" type veth peer name eth0 netns "$ns" \
      || die "cannot create a veth pair for host $i"
    ip -n "$SWITCH" link set "port$i" master br0 up || die "cannot attach host $i to the bridge"
    ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0 || die "cannot address host $i"
    ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up || die "cannot bring host $i up"
    shape "$ns" eth0 || die "tc tbf at '$RATE' failed on host $i"
    shape "$SWITCH" "port$i" || die "tc tbf at '$RATE' failed toward host $i"
  done
}

build
if ((CHECK)); then
  # No ping here: a TCP connect to a closed port of the last host must be refused (not time out).
  reply="$(timeout 5 ip netns exec "$PREFIX-h0" bash -c "exec 3<>/dev/tcp/$SUBNET.$HOSTS/9" 2>&1)"
  [[ "$reply" == *refused* ]] || die "hosts cannot reach each other across the bridge"
  echo "netns-cluster: $HOSTS hosts can be built here"
  exit 0
fi

if [[ -n "${TORCHRUN:-}" ]]; then :
elif [[ -n "${PYTHON:-}" && -x "$(dirname "$PYTHON")/torchrun" ]]; then TORCHRUN="$(dirname "$PYTHON")/torchrun"
else TORCHRUN="$(command -v torchrun)" || die "torchrun not found (set TORCHRUN)"; fi

LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/$PREFIX.XXXXXX")"
for ((i = 0; i < HOSTS; i++)); do
  ip netns exec "$PREFIX-h$i" env \
    GLOO_SOCKET_IFNAME=eth0 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
    "$TORCHRUN" --nnodes="$HOSTS" --nproc_per_node="$PROCS" \
      --rdzv-backend=c10d --rdzv-endpoint="$SUBNET.1:$PORT" --rdzv-id="$RDZV_ID" \
      --rdzv-conf "is_host=$((i == 0 ? 1 : 0))" --local-addr="$SUBNET.$((i + 1))" \
      -m distnn.train "$@" >"$LOGDIR/host$i.log" 2>&1 </dev/null &
  AGENTS+=("$!")
done

# Wait for every agent. When one fails the others could wait long in the rendezvous: give
# them 15 s to notice, then stop them.
declare -A CODE=()
started=$SECONDS failed_at=""
while ((${#CODE[@]} < HOSTS)); do
  for i in "${!AGENTS[@]}"; do
    [[ -n "${CODE[$i]:-}" ]] && continue
    kill -0 "${AGENTS[$i]}" 2>/dev/null && continue
    wait "${AGENTS[$i]}"; CODE[$i]=$?
    ((CODE[$i] == 0)) || failed_at="${failed_at:-$SECONDS}"
  done
  ((${#CODE[@]} < HOSTS)) || break
  if [[ -n "$failed_at" ]] && ((SECONDS - failed_at > 15)); then
    echo "netns-cluster: a host failed; stopping the others" >&2; kill_inside "${NAMESPACES[@]}"
  elif ((TIMEOUT > 0 && SECONDS - started > TIMEOUT)); then
    echo "netns-cluster: --timeout $TIMEOUT s reached; stopping the job" >&2
    failed_at="${failed_at:-$SECONDS}"; kill_inside "${NAMESPACES[@]}"
  fi
  sleep 0.1
done

status=0
for ((i = 0; i < HOSTS; i++)); do
  echo "== host $i ($SUBNET.$((i + 1)), $PROCS rank(s), ${RATE:-unshaped}): exit ${CODE[$i]} =="
  cat "$LOGDIR/host$i.log"
  ((CODE[$i] == 0)) || status=1
done
exit "$status"

#!/usr/bin/env bash
# A test bed of N "hosts" on this Linux machine: network namespaces on one bridge, each with its own
# address, hostname and sshd, pinned to its own core. Needs root, iproute2 (ip netns), util-linux
# (unshare, nsenter, taskset) and openssh-server (launch/setup.sh installs it when run as root).
#
# Usage: launch/testbed.sh COMMAND [ARGS]
#   up N               bring hosts h1..hN up (first removes whatever a previous test bed left)
#   down               remove every host, the bridge and their files (safe to repeat)
#   status             the hosts that are up, one "name address pid-of-sshd" line each
#   exec HOST CMD...   run CMD on HOST as if logged in there (its network, hostname, /etc/hosts,
#                      core), in the current directory; e.g. exec h1 launch/multihost.sh -H h1:2,h2:2
#   kill HOST          SIGKILL every process of HOST (a host lost); its sshd too
#   start HOST         start HOST's sshd again after kill (a host back)
#   link HOST up|down  set HOST's only link up or down (a network partition)
#   shape HOST RATE    limit HOST's outgoing rate with tbf, e.g. 20mbit; "shape HOST off" removes it
#   loss HOST PCT      drop PCT% of HOST's incoming and outgoing packets (nftables); 0 removes it
#
# Host i is "hI", address 10.77.0.(10+i) on interface dt0 of namespace dt-hI (on bed K: 10.77.K.(10+i),
# dtK-hI), and runs on core (i-1) mod the cores here; the bridge lives in its own namespace dt-br
# (dtK-br), so nothing outside the test bed's namespaces gets an address or a route. Every host shares this machine's file system, so
# the repository, its venv and run directories are on a "shared file system". ssh between hosts
# (root, a key made for the test bed) needs no password and checks no host key.
#
# Variables:
#   DTRAIN_TESTBED_ID    which test bed, 0 (default) to 99: bed K's namespaces are dtK-hI (dt-hI for
#                        bed 0) on subnet 10.77.K.0/24, so beds can be up side by side (a benchmark
#                        beside a test run); every command acts on this bed only
#   DTRAIN_TESTBED_DIR   state: keys, sshd configs and logs (default /tmp/dtrain-testbed, and
#                        /tmp/dtrain-testbed-K for bed K > 0)
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { printf 'testbed.sh: error: %s\n' "$*" >&2; exit 2; }
log() { printf '[testbed] %s\n' "$*" >&2; }

bed=${DTRAIN_TESTBED_ID:-0}
[[ "$bed" =~ ^([0-9]|[1-9][0-9])$ ]] || die "DTRAIN_TESTBED_ID=$bed: a number from 0 to 99"
prefix=dt; [ "$bed" = 0 ] || prefix=dt$bed
default_state=/tmp/dtrain-testbed; [ "$bed" = 0 ] || default_state=/tmp/dtrain-testbed-$bed
state=${DTRAIN_TESTBED_DIR:-$default_state}
subnet=10.77.$bed
brns=$prefix-br

ns() { echo "$prefix-$1"; }
index() { [[ "$1" =~ ^h([1-9][0-9]*)$ ]] || die "no host '$1'; hosts are h1, h2, ..."; echo "${BASH_REMATCH[1]}"; }
address() { echo "$subnet.$((10 + $(index "$1")))"; }
sshd_pid() { cat "$state/$1/sshd.pid" 2>/dev/null || true; }
core() { echo $(( ($(index "$1") - 1) % $(nproc) )); }
hosts_up() { ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^$prefix-\\(h[0-9]*\\)\$/\\1/p" | sort -V; }
require_root() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces); run as root or with sudo"
  command -v ip >/dev/null && ip netns list >/dev/null 2>&1 || die "no 'ip netns' here; install iproute2"
  [ -x /usr/sbin/sshd ] || command -v sshd >/dev/null || die "no sshd; install openssh-server (launch/setup.sh does as root)"
}
require_host() {
  ip netns list | awk '{print $1}' | grep -qx "$(ns "$1")" || die "host $1 is not up; launch/testbed.sh up N"
}

# tbf's bucket: 1 ms of the rate, at least 4 kB and a 64 kB segment (veth hands tbf whole GSO
# segments). A fixed small bucket caps a fast link far below its rate: tbf waits on a timer per
# bucketful (a 4 kB bucket held "10gbit" to a small fraction of it).
burst() {
  local rate=$1 bits
  [[ "$rate" =~ ^([0-9]+)(bit|kbit|mbit|gbit)$ ]] || die "rate '$rate': a number with bit, kbit, mbit or gbit"
  case ${BASH_REMATCH[2]} in
    bit) bits=${BASH_REMATCH[1]} ;; kbit) bits=$((BASH_REMATCH[1] * 1000)) ;;
    mbit) bits=$((BASH_REMATCH[1] * 1000000)) ;; gbit) bits=$((BASH_REMATCH[1] * 1000000000)) ;;
  esac
  local bytes=$((bits / 8 / 1000))
  [ "$bytes" -ge 65536 ] || bytes=65536
  echo "$bytes"
}

start_sshd() {
  local host=$1 dir=$state/$1
  rm -f "$dir/sshd.pid"
  mkdir -p /run/sshd  # sshd's privilege separation directory, missing where no sshd ran yet
  # The sshd gets the host's network, a hostname of its own (UTS namespace) and the host's /etc
  # (ip netns exec bind-mounts /etc/netns/dt-hI/* over /etc), and its core: everything started over
  # ssh inherits all four, as on a machine of its own.
  ip netns exec "$(ns "$host")" taskset -c "$(core "$host")" unshare --uts \
    sh -c "hostname $host && exec $(command -v sshd) -f /etc/ssh/sshd_config -E $dir/sshd.log" \
    </dev/null >/dev/null 2>&1
  for _ in $(seq 100); do
    [ -s "$dir/sshd.pid" ] && return 0
    sleep 0.05
  done
  die "sshd of $host did not start; see $dir/sshd.log"
}

down() {
  local host
  for host in $(hosts_up); do
    ip netns pids "$(ns "$host")" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  done
  for host in $(hosts_up); do
    ip netns delete "$(ns "$host")" 2>/dev/null || true
    rm -rf "/etc/netns/$(ns "$host")"
  done
  if ip netns list | awk '{print $1}' | grep -qx "$brns"; then ip netns delete "$brns"; fi
  rm -rf "/etc/netns/$prefix"-h[0-9]* "$state"  # also what a crashed run left without its namespace
}

up() {
  local n=$1 i host dir
  [[ "$n" =~ ^[1-9][0-9]?$ ]] || die "up N: N is a number of hosts from 1 to 99, got '$n'"
  down
  mkdir -p "$state"
  ssh-keygen -q -t ed25519 -N "" -C dtrain-testbed -f "$state/id_ed25519"
  ssh-keygen -q -t ed25519 -N "" -C dtrain-testbed-host -f "$state/host_key"
  {
    echo "127.0.0.1 localhost"
    for i in $(seq 1 "$n"); do echo "$subnet.$((10 + i)) h$i"; done
  } >"$state/hosts"
  ip netns add "$brns"
  ip -n "$brns" link add dtbr0 type bridge
  ip -n "$brns" link set dtbr0 up
  for i in $(seq 1 "$n"); do
    host=h$i dir=$state/h$i
    mkdir -p "$dir" "/etc/netns/$(ns "$host")/ssh"
    ip netns add "$(ns "$host")"
    ip link add "dtv$i" netns "$brns" type veth peer name dt0 netns "$(ns "$host")"
    ip -n "$brns" link set "dtv$i" master dtbr0 up
    ip -n "$(ns "$host")" addr add "$(address "$host")/24" dev dt0
    ip -n "$(ns "$host")" link set dt0 up
    ip -n "$(ns "$host")" link set lo up
    local etc=/etc/netns/$(ns "$host")
    cp "$state/hosts" "$etc/hosts"
    echo "$host" >"$etc/hostname"
    cat >"$etc/ssh/sshd_config" <<EOF
ListenAddress $(address "$host")
HostKey $state/host_key
PidFile $dir/sshd.pid
PermitRootLogin prohibit-password
AuthorizedKeysFile $state/id_ed25519.pub
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
# horovodrun opens a session per rank and per task service at once
MaxStartups 100
MaxSessions 100
AcceptEnv *
EOF
    cat >"$etc/ssh/ssh_config" <<EOF
Host *
  IdentityFile $state/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  ConnectTimeout 10
EOF
    start_sshd "$host"
  done
  for i in $(seq 1 "$n"); do
    # A host is up when the first one reaches it over ssh as horovodrun will.
    "$0" exec h1 ssh -o BatchMode=yes "h$i" true || die "h1 cannot ssh to h$i; see $state/h$i/sshd.log"
  done
  log "up: $n hosts (h1..h$n on $subnet.0/24), state in $state"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  -h|--help|"") usage; [ -n "$cmd" ] ;;
  up) require_root; [ $# = 1 ] || die "usage: up N"; up "$1" ;;
  down) require_root; down ;;
  status)
    for host in $(hosts_up); do echo "$host $(address "$host") $(sshd_pid "$host")"; done ;;
  exec)
    [ $# -ge 2 ] || die "usage: exec HOST CMD..."
    host=$1; shift; require_host "$host"
    pid=$(sshd_pid "$host")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || die "host $host is down (its sshd is not running); start $host"
    # The sshd's namespaces (network, hostname, /etc) and its core: a login on that host.
    exec nsenter -t "$pid" -n -u -m --wd="$PWD" -- taskset -c "$(core "$host")" "$@" ;;
  kill)
    [ $# = 1 ] || die "usage: kill HOST"; require_host "$1"
    ip netns pids "$(ns "$1")" | xargs -r kill -9 2>/dev/null || true ;;
  start)
    [ $# = 1 ] || die "usage: start HOST"; require_host "$1"
    pid=$(sshd_pid "$1")
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then start_sshd "$1"; fi ;;
  link)
    [ $# = 2 ] && [[ "$2" =~ ^(up|down)$ ]] || die "usage: link HOST up|down"; require_host "$1"
    ip -n "$brns" link set "dtv$(index "$1")" "$2" ;;
  shape)
    [ $# = 2 ] || die "usage: shape HOST RATE|off"; require_host "$1"
    ip netns exec "$(ns "$1")" tc qdisc del dev dt0 root 2>/dev/null || true
    [ "$2" = off ] || ip netns exec "$(ns "$1")" tc qdisc add dev dt0 root tbf rate "$2" burst "$(burst "$2")" latency 400ms ;;
  loss)
    [ $# = 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || die "usage: loss HOST PCT"; require_host "$1"
    ip netns exec "$(ns "$1")" nft delete table inet dtloss 2>/dev/null || true
    if [ "$2" != 0 ]; then
      ip netns exec "$(ns "$1")" nft -f - <<EOF
table inet dtloss {
  chain in { type filter hook input priority 0; numgen random mod 100 < $2 drop; }
  chain out { type filter hook output priority 0; numgen random mod 100 < $2 drop; }
}
EOF
    fi ;;
  *) die "unknown command '$cmd'; see --help" ;;
esac

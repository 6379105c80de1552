#!/usr/bin/env bash
# A real Slurm cluster on one machine, for miles' integration tests and for trying
# `miles submit` on a laptop. Debian/Ubuntu packages (Slurm 22.05 on bookworm),
# root, no systemd needed.
#
#   slurm/local-cluster.sh install   apt-get the packages (once; idempotent)
#   slurm/local-cluster.sh start     start munged, MariaDB + slurmdbd, slurmctld and N
#                                    slurmd "nodes"; wait until every node is idle.
#                                    A cluster that is already up is left as it is.
#   slurm/local-cluster.sh stop      cancel all jobs, stop every daemon by its recorded PID
#   slurm/local-cluster.sh status    exit 0 when up (prints sinfo and the PIDs), 1 when down
#   slurm/local-cluster.sh env       print `export SLURM_CONF=...` (eval it in your shell)
#
# Settings (environment):
#   MILES_SLURM_DIR         state directory (default /tmp/miles-slurm)
#   MILES_SLURM_NODES       virtual nodes node1..nodeN (default 4; 16 works)
#   MILES_SLURM_GPUS        fake GPUs per node (default 4)
#   MILES_SLURM_CPUS        CPUs declared per node (default 8)
#   MILES_SLURM_MEM         memory declared per node in MB (default 16000)
#   MILES_SLURM_ACCOUNTING  1 (default): MariaDB + slurmdbd so sacct answers; 0: none
#
# Every daemon started is recorded as "name pid" in $MILES_SLURM_DIR/run/pids; stop
# signals exactly those PIDs and nothing else. start adds the node names to
# /etc/hosts (torch's rendezvous must resolve "node1"); stop removes that line.
set -euo pipefail
set +m   # no job control: `setsid cmd &` then execs in place, so $! is the daemon's PID

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${MILES_SLURM_DIR:-/tmp/miles-slurm}
NNODES=${MILES_SLURM_NODES:-4}
NGPUS=${MILES_SLURM_GPUS:-4}
NCPUS=${MILES_SLURM_CPUS:-8}
MEM=${MILES_SLURM_MEM:-16000}
ACCOUNTING=${MILES_SLURM_ACCOUNTING:-1}
export SLURM_CONF=$BASE/etc/slurm.conf
PIDS=$BASE/run/pids
HOSTS_MARK="# miles local slurm nodes"
NODES=()
for ((i = 1; i <= NNODES; i++)); do NODES+=("node$i"); done

log() { echo "[local-cluster $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }

wait_for() { # wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s, bounded
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then log "timed out after ${t}s waiting for: $what"; return 1; fi
    sleep 0.2
  done
}

check_settings() {
  [[ $NNODES =~ ^[0-9]+$ ]] && ((NNODES >= 1 && NNODES <= 64)) || die "MILES_SLURM_NODES=$NNODES: need 1..64"
  [[ $NGPUS =~ ^[0-9]+$ ]] && ((NGPUS >= 1 && NGPUS <= 16)) || die "MILES_SLURM_GPUS=$NGPUS: need 1..16"
  [[ $NCPUS =~ ^[0-9]+$ ]] && ((NCPUS >= 1)) || die "MILES_SLURM_CPUS=$NCPUS: need a positive integer"
  [[ $MEM =~ ^[0-9]+$ ]] || die "MILES_SLURM_MEM=$MEM: need megabytes as an integer"
}

packages() {
  local p=(slurm-wlm munge)
  [ "$ACCOUNTING" = 1 ] && p+=(slurmdbd mariadb-server)
  echo "${p[@]}"
}

do_install() {
  local missing=() p
  for p in $(packages); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} = 0 ]; then log "installed already: $(packages)"; return 0; fi
  [ "$(id -u)" = 0 ] || die "installing ${missing[*]} needs root (apt-get)"
  command -v apt-get >/dev/null || die "no apt-get: install ${missing[*]} with your package manager"
  log "apt-get install ${missing[*]}"
  apt-get update -q
  # --no-install-recommends: 9 packages instead of 43 (hdf5, rocm, influxdb plugins...)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

record() { echo "$1 $2" >> "$PIDS"; }

ms() { echo $(( $(date +%s%N) / 1000000 )); }
PHASES=""
phase() { PHASES+=" $1=$(( $(ms) - T0 ))ms"; }  # cumulative milliseconds since start began

recorded_alive() { # every recorded daemon still runs
  [ -s "$PIDS" ] || return 1
  local name pid
  # /proc, not kill -0: a non-root user may check a cluster that root started
  while read -r name pid; do [ -d "/proc/$pid" ] || return 1; done < "$PIDS"
}

all_idle() {
  local states
  # sinfo -N prints one line per node *and partition*: dedupe by node name
  states=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
  [ "$(grep -c ' idle$' <<<"$states")" -eq "$NNODES" ]
}

render() { # render TEMPLATE OUT
  sed -e "s|@BASE@|$BASE|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@NODES@|$NNODES|g" \
      -e "s|@LAST@|$((17000 + NNODES))|g" -e "s|@CPUS@|$NCPUS|g" -e "s|@MEM@|$MEM|g" \
      -e "s|@GPUS@|$NGPUS|g" -e "s|@LASTGPU@|$((NGPUS - 1))|g" \
      -e "s|@ACCT_STORAGE@|$ACCT_STORAGE|g" -e "s|@ACCT_GATHER@|$ACCT_GATHER|g" "$1" > "$2"
}

start_munge() {
  # Debian's postinst creates the key; make one if a minimal image lacks it.
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  if munge -n >/dev/null 2>&1; then
    log "a munged already answers; using it (not ours to stop)"
    return 0
  fi
  setsid setpriv --reuid=munge --regid=munge --init-groups \
    munged -F --log-file="$BASE/log/munged.log" --pid-file=/run/munge/munged.pid \
    </dev/null >"$BASE/log/munged.out" 2>&1 &
  record munged $!
  wait_for 20 "munged" munge -n
}

start_accounting() {
  # MariaDB with its data in $BASE/mysql, socket auth only, no TCP. A pristine
  # datadir is made once ($BASE/mysql-template, ~4 s) and copied at each start (~0.5 s).
  install -d -o mysql -g root -m 0755 /run/mysqld
  if mariadb -e 'select 1' >/dev/null 2>&1; then
    die "a MariaDB/MySQL server already answers on /run/mysqld/mysqld.sock; stop it or use MILES_SLURM_ACCOUNTING=0"
  fi
  if [ ! -f "$BASE/mysql-template/.miles-complete" ]; then
    rm -rf "$BASE/mysql-template"; install -d -o mysql -g mysql "$BASE/mysql-template"
    mariadb-install-db --user=mysql --datadir="$BASE/mysql-template" --auth-root-authentication-method=socket \
      --skip-test-db --innodb-log-file-size=8M >"$BASE/log/mariadb-install.log" 2>&1
    touch "$BASE/mysql-template/.miles-complete"
  fi
  rm -rf "$BASE/mysql"; cp -a "$BASE/mysql-template" "$BASE/mysql"
  install -o mysql -m 0644 /dev/null "$BASE/log/mariadbd.err"   # mariadbd runs as mysql
  setsid mariadbd --user=mysql --datadir="$BASE/mysql" --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/miles-mariadbd.pid --skip-networking \
    --innodb-buffer-pool-size=32M --innodb-log-file-size=8M \
    --log-error="$BASE/log/mariadbd.err" </dev/null >"$BASE/log/mariadbd.out" 2>&1 &
  record mariadbd $!
  wait_for 60 "mariadbd" mariadb -e 'select 1' || { tail -5 "$BASE/log/mariadbd.err" >&2; return 1; }
  render "$HERE/slurmdbd.conf.in" "$BASE/etc/slurmdbd.conf"
  chmod 600 "$BASE/etc/slurmdbd.conf"   # slurmdbd refuses anything else
  SLURM_CONF=$SLURM_CONF setsid slurmdbd -D </dev/null >"$BASE/log/slurmdbd.out" 2>&1 &
  record slurmdbd $!
  wait_for 60 "slurmdbd" timeout 5 sacctmgr -n list cluster || { tail -5 "$BASE/log/slurmdbd.log" >&2; return 1; }
}

do_start() {
  check_settings
  if recorded_alive && timeout 5 scontrol ping >/dev/null 2>&1; then
    if wait_for 30 "all $NNODES nodes idle" all_idle; then
      log "already up: $(timeout 5 sinfo -h -o '%D nodes %t' -p debug | paste -sd' ')"
      return 0
    fi
    die "a cluster is up in $BASE but not with $NNODES idle nodes; run stop first"
  fi
  [ -s "$PIDS" ] && { log "stale $PIDS: stopping what is left of it"; do_stop; }
  [ "$(id -u)" = 0 ] || die "start needs root (daemons, /etc/hosts)"
  for p in $(packages); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || die "$p is not installed: run $0 install"
  done
  T0=$(ms)
  rm -rf "$BASE/state" "$BASE/spool" "$BASE/log" "$BASE/etc" "$BASE/dev"
  rm -rf "$BASE/run/started-by-tests" "$BASE/run/test-users"   # bookkeeping of tests/integration/conftest.py
  mkdir -p "$BASE"/{etc,state,run,log,dev}
  for n in "${NODES[@]}"; do mkdir -p "$BASE/spool/$n"; done
  if [ "$ACCOUNTING" = 1 ]; then
    ACCT_STORAGE=accounting_storage/slurmdbd ACCT_GATHER=jobacct_gather/linux
  else
    ACCT_STORAGE=accounting_storage/none ACCT_GATHER=jobacct_gather/none
  fi
  render "$HERE/slurm.conf.in" "$SLURM_CONF"
  render "$HERE/gres.conf.in" "$BASE/etc/gres.conf"
  # gres.conf File= must be a char/block device: symlinks to /dev/null pass.
  for ((i = 0; i < NGPUS; i++)); do ln -sfn /dev/null "$BASE/dev/gpu$i"; done
  # Node names must resolve (MASTER_ADDR is the first host of the node list).
  # /etc/hosts is rewritten in place: it may be a bind mount.
  if grep -q "$HOSTS_MARK" /etc/hosts; then
    local kept; kept=$(grep -v "$HOSTS_MARK" /etc/hosts); printf '%s\n' "$kept" > /etc/hosts
  fi
  echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >> /etc/hosts

  start_munge; phase munged
  if [ "$ACCOUNTING" = 1 ]; then start_accounting; phase accounting; fi

  # -i: ignore saved state (fresh cluster each start)
  setsid slurmctld -D -i -f "$SLURM_CONF" </dev/null >"$BASE/log/slurmctld.out" 2>&1 &
  record slurmctld $!
  wait_for 30 "slurmctld" timeout 5 scontrol ping || { tail -5 "$BASE/log/slurmctld.log" >&2; return 1; }
  phase slurmctld
  for n in "${NODES[@]}"; do
    setsid slurmd -D -N "$n" -f "$SLURM_CONF" </dev/null >"$BASE/log/slurmd-$n.out" 2>&1 &
    record "slurmd-$n" $!
  done
  if ! wait_for 60 "all $NNODES nodes idle" all_idle; then
    timeout 5 sinfo -N -l >&2 || true
    return 1
  fi
  phase nodes-idle
  log "up: $NNODES nodes x $NGPUS GPUs, accounting=$ACCOUNTING (${PHASES# }); $(do_env)"
}

term_and_wait() { # PIDs...: SIGTERM each live one, wait up to 15 s, then SIGKILL what is left
  local pid live=()
  for pid in "$@"; do
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null && live+=("$pid"); fi
  done
  [ ${#live[@]} = 0 ] && return 0
  local end=$((SECONDS + 15)) any
  while ((SECONDS < end)); do
    any=0
    for pid in "${live[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    [ $any = 0 ] && return 0
    sleep 0.2
  done
  for pid in "${live[@]}"; do kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null && log "KILL $pid"; done
  return 0
}

do_stop() {
  if [ -s "$PIDS" ]; then
    # 1. end jobs first so no job process outlives its slurmd
    if timeout 5 scontrol ping >/dev/null 2>&1; then
      timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true
      wait_for 20 "queue empty" bash -c '[ -z "$(timeout 5 squeue -h -o %i)" ]' || true
    fi
    # 2. by recorded PID only: slurmd + slurmctld together, then slurmdbd, then mariadbd/munged
    term_and_wait $(awk '$1 ~ /^slurm(d-|ctld)/ {print $2}' "$PIDS")
    term_and_wait $(awk '$1 == "slurmdbd" {print $2}' "$PIDS")
    term_and_wait $(awk '$1 !~ /^slurm/ {print $2}' "$PIDS")
    mv "$PIDS" "$PIDS.stopped"
    rm -rf "$BASE/run/started-by-tests" "$BASE/run/test-users"
  else
    log "nothing recorded in $PIDS"
  fi
  if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    local kept; kept=$(grep -v "$HOSTS_MARK" /etc/hosts); printf '%s\n' "$kept" > /etc/hosts
  fi
  log "stopped"
}

do_status() {
  if recorded_alive && timeout 5 scontrol ping >/dev/null 2>&1; then
    timeout 5 sinfo -N -o '%N %P %t %c %m %G' || true
    cat "$PIDS"
    return 0
  fi
  echo "down (no live daemons recorded in $PIDS)"
  return 1
}

do_env() { echo "export SLURM_CONF=$SLURM_CONF"; }

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  env) do_env ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac

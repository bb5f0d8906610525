#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests: installs slurm-wlm and munge if missing, writes
# a configuration from the machine's hostname, CPUs and memory into a private folder, starts munged,
# slurmctld and slurmd as child processes and waits for the node. The daemons are stopped by PID when
# the command given after "--" exits (whatever its exit code), or by "stop DIR".
#
#   scripts/slurm-cluster.sh run DIR -- COMMAND...   start, run COMMAND with SLURM_CONF set, stop
#   scripts/slurm-cluster.sh stop DIR                stop what a run left behind
set -euo pipefail

need_root() { [ "$(id -u)" -eq 0 ] || { echo "slurm-cluster: needs root (slurmd runs jobs as their user)" >&2; exit 1; }; }

install() {
  local missing=""
  for p in slurm-wlm munge; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "slurm-cluster: installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
}

stop() {
  local dir=$1
  for name in slurmd slurmctld munged; do
    local f="$dir/$name.pid"
    [ -f "$f" ] || continue
    local pid
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

start() {
  local dir=$1
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
  chmod 700 "$dir/munge"
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  # munge: our own key and socket, so a system munged (if any) is left alone.
  if [ ! -f "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
  fi
  cat > "$dir/slurm.conf" <<EOF
ClusterName=qconvert-test
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$((20000 + RANDOM % 20000))
SlurmdPort=$((40000 + RANDOM % 10000))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  export SLURM_CONF="$dir/slurm.conf"
  munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" -f
  slurmctld -D -f "$SLURM_CONF" -i > "$dir/log/slurmctld.out" 2>&1 &
  echo $! > "$dir/slurmctld.pid"
  slurmd -D -f "$SLURM_CONF" > "$dir/log/slurmd.out" 2>&1 &
  echo $! > "$dir/slurmd.pid"
  for _ in $(seq 300); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm-cluster: node $host up ($cpus CPUs, $mem MB)"
      return 0
    fi
    sleep 0.2
  done
  echo "slurm-cluster: the node did not come up; logs in $dir/log" >&2
  tail -n 20 "$dir"/log/*.log "$dir"/log/*.out >&2 || true
  return 1
}

case "${1:-}" in
  run)
    need_root
    dir=$(mkdir -p "$2" && cd "$2" && pwd)
    shift 2
    [ "${1:-}" = "--" ] && shift
    install
    trap 'stop "$dir"' EXIT
    trap 'exit 130' INT TERM
    start "$dir"
    SLURM_CONF="$dir/slurm.conf" "$@"
    ;;
  stop)
    stop "$(cd "$2" && pwd)"
    ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 64
    ;;
esac

#!/usr/bin/env bash
# A real, throw-away SLURM cluster on this machine: slurmctld + two slurmd "nodes" (n1, n2) + munge, as root,
# without systemd. For tests and for trying the sbatch scripts in slurm/. Debian/Ubuntu (apt), slurm-wlm 22.05.
#
#   slurm/local_cluster.sh up       install what is missing, start (idempotent: a healthy cluster is left alone)
#   slurm/local_cluster.sh status   exit 0 when the cluster answers and its nodes are usable
#   slurm/local_cluster.sh down     cancel all jobs, stop only the daemons this script started, undo its edits
#
# Settings: FLEXRANK_SLURM_DIR (state, logs, pids; default /tmp/flexrank-slurm), FLEXRANK_SLURM_NODES (2),
# FLEXRANK_SLURM_CPUS (CPUs per node, default nproc), FLEXRANK_SLURM_GPUS (GPUs per node, default 4: /dev/null
# stand-ins, so that the scripts' --gpus-per-node and SLURM_GPUS_ON_NODE work unchanged on CPU).
# Outside $DIR it touches /etc/hosts (one tagged line: the node names must resolve), /etc/slurm/slurm.conf (a
# symlink, so plain sbatch works) and /run/munge.
set -euo pipefail
DIR=${FLEXRANK_SLURM_DIR:-/tmp/flexrank-slurm}
NODES=${FLEXRANK_SLURM_NODES:-2}
CPUS=${FLEXRANK_SLURM_CPUS:-$(nproc)}
GPUS=${FLEXRANK_SLURM_GPUS:-4}
TAG="# flexrank-local-slurm"
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF

log() { echo "[local_cluster] $*" >&2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  log "installing slurmctld slurmd slurm-client munge (apt)"
  # Keep apt's postinst scripts from starting the services: this script runs the daemons itself.
  local guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
  [ -n "$guard" ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

write_config() {
  local host mem
  host=$(hostname -s)  # must be this host's name, or slurmctld refuses to act as the controller
  mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  mkdir -p "$DIR"/{etc,state,spool,log,run,pids,dev}
  local gres="" i
  if [ "$GPUS" -gt 0 ]; then  # GPUs need device files: /dev/null stand-ins (a count alone is rejected)
    for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$DIR/dev/nvidia$i"; done
    echo "Name=gpu File=$DIR/dev/nvidia[0-$((GPUS - 1))]" > "$DIR/etc/gres.conf"
    gres="Gres=gpu:$GPUS"
  fi
  cat > "$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh: a test cluster of $NODES fake nodes on one host.
ClusterName=flexrank
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# The default 60 s scheduling loop would leave requeued jobs pending for up to a minute.
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
$([ "$GPUS" -gt 0 ] && echo GresTypes=gpu)
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-$((17000 + NODES)) CPUs=$CPUS RealMemory=$mem $gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

# start NAME COMMAND...: run a daemon in the foreground in a session of its own, remembering its pid.
start() {
  local name=$1; shift
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$DIR/pids/$name.pid" "$@" \
    >> "$DIR/log/$name.out" 2>&1 < /dev/null &
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_works && return  # an already running munged (e.g. started by systemd) is reused and left alone
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey -c 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge && chown munge:munge /run/munge /var/lib/munge /var/log/munge
  start munged setpriv --reuid=munge --regid=munge --init-groups munged -F
  for _ in $(seq 50); do munge_works && return; sleep 0.1; done
  log "munged did not start"; return 1
}

healthy() {
  [ -f "$CONF" ] && [ -f "$DIR/pids/slurmctld.pid" ] || return 1
  local states
  states=$(timeout 10 sinfo -h -N -o '%t' 2>/dev/null) || return 1
  [ "$(echo "$states" | grep -cE '^(idle|mix|alloc|comp)')" -eq "$NODES" ]
}

ours_alive() {  # ours_alive NAME: the pid file's process still runs the program we started
  local pid; pid=$(cat "$DIR/pids/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && grep -qx "${1%%.*}" "/proc/$pid/comm" 2>/dev/null
}

up() {
  if healthy; then log "already up"; return 0; fi
  [ -d "$DIR/pids" ] && down
  install_packages
  rm -rf "$DIR"  # cold start: fresh state, job ids from 1
  write_config
  grep -q "$TAG" /etc/hosts || { hosts=$(cat /etc/hosts); printf '%s\n127.0.0.1 %s  %s\n' "$hosts" \
    "$(seq -f 'n%g' -s ' ' 1 "$NODES")" "$TAG" > /etc/hosts; }  # rewritten in place: /etc/hosts may be a bind mount
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then ln -sfn "$CONF" /etc/slurm/slurm.conf; fi
  start_munge
  start slurmctld slurmctld -D -f "$CONF"
  for n in $(seq "$NODES"); do start "slurmd.n$n" slurmd -D -N "n$n" -f "$CONF"; done
  for _ in $(seq 100); do healthy && break; sleep 0.2; done
  if healthy && timeout 30 srun -N"$NODES" true; then
    log "up: $NODES nodes (SLURM_CONF=$CONF)"; return 0
  fi
  log "failed to start; logs:"; tail -n 20 "$DIR"/log/*.log >&2 || true
  [ -n "${FLEXRANK_SLURM_KEEP_ON_FAIL:-}" ] || down
  return 1
}

down() {
  if [ -f "$CONF" ] && ours_alive slurmctld; then
    timeout 10 scancel --full --state=RUNNING,PENDING,SUSPENDED -u root 2>/dev/null || true
    for _ in $(seq 20); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  local pidfiles=("$DIR"/pids/*.pid)
  for f in "${pidfiles[@]}"; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    ours_alive "$name" && kill -TERM "$(cat "$f")" 2>/dev/null || true
  done
  for f in "${pidfiles[@]}"; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    for _ in $(seq 100); do ours_alive "$name" || break; sleep 0.1; done
    ours_alive "$name" && kill -KILL "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  rmdir "$DIR/pids" 2>/dev/null || true
  [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ] && rm -f /etc/slurm/slurm.conf
  if grep -q "$TAG" /etc/hosts; then hosts=$(grep -v "$TAG" /etc/hosts); printf '%s\n' "$hosts" > /etc/hosts; fi
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) if healthy; then sinfo; else log "not running"; exit 1; fi ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

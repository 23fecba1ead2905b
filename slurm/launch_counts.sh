# Launch counts, computed at run time from the allocation this start actually got (not at render
# time), so a requeued or resubmitted job that lands on other nodes, GPUs or CPUs launches with
# those, and `--resume auto` continues the run on the new process count (docs/checkpoints.md,
# "Resuming on another number of processes"). Rendered at the job's request: {{requested}}.
#   nodes:             SLURM_JOB_NUM_NODES (or SLURM_NNODES)
#   processes a node:  GPU job: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE, else the
#                      CUDA_VISIBLE_DEVICES count, else the rendered GPUs per node;
#                      CPU job: the rendered processes x CPUs per task (SLURM_CPUS_PER_TASK) / the
#                      rendered CPUs per task, at least 1 (the rendered count on the rendered CPUs)
#   machine rank:      SLURM_NODEID, expanded in each srun task (see the srun line)
#   main address:      the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`)
REQUESTED_GPUS_PER_NODE={{gpus_per_node}}  # at render time; 0 = a CPU job
REQUESTED_PROCESSES_PER_NODE={{processes_per_node}}
REQUESTED_CPUS_PER_TASK={{cpus_per_task}}
ADD_MULTI_GPU={{multi_gpu}}  # no when an accelerate config decides the distributed type
NODES=${SLURM_JOB_NUM_NODES:-}
[ -n "$NODES" ] || NODES=${SLURM_NNODES:-1}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$REQUESTED_CPUS_PER_TASK}
count_gpus() {
  local n
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    n=$SLURM_GPUS_ON_NODE
  elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
    n=${SLURM_GPUS_PER_NODE##*:}  # 4, gpu:4 or a100:4
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    n=$(printf '%s\n' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
  fi
  case "${n:-}" in ''|*[!0-9]*) echo 0 ;; *) echo "$n" ;; esac
}
if [ "$REQUESTED_GPUS_PER_NODE" -gt 0 ]; then
  PROCS_PER_NODE=$(count_gpus)
  if [ "$PROCS_PER_NODE" -lt 1 ]; then
    echo "launcher.slurm: no GPU count in SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE or CUDA_VISIBLE_DEVICES;" \
         "using the rendered ${REQUESTED_GPUS_PER_NODE} per node"
    PROCS_PER_NODE=$REQUESTED_GPUS_PER_NODE
  fi
else
  PROCS_PER_NODE=$((REQUESTED_PROCESSES_PER_NODE * CPUS_PER_TASK / REQUESTED_CPUS_PER_TASK))
  [ "$PROCS_PER_NODE" -ge 1 ] || PROCS_PER_NODE=1
fi
TOTAL_PROCESSES=$((NODES * PROCS_PER_NODE))

ACCELERATE_ARGS=(
  {{accelerate_args}}
  --num_machines "$NODES" --num_processes "$TOTAL_PROCESSES"
)
if [ "$ADD_MULTI_GPU" = yes ] && [ "$TOTAL_PROCESSES" -gt 1 ]; then
  ACCELERATE_ARGS+=(--multi_gpu)
fi
if [ "$NODES" -gt 1 ]; then
  # c10d rendezvous on the first node of the allocation, at a port derived from the job id.
  HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))
  ACCELERATE_ARGS+=(--main_process_ip "$HEAD_NODE" --main_process_port "$RDZV_PORT" --rdzv_backend c10d)
  WHERE="${NODES} node(s) x ${PROCS_PER_NODE} process(es), rendezvous ${HEAD_NODE}:${RDZV_PORT}"
else
  ACCELERATE_ARGS+=(--main_process_port 0)  # any free port: jobs sharing a node do not collide
  WHERE="1 node x ${PROCS_PER_NODE} process(es)"
fi

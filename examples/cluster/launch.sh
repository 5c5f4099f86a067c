#!/usr/bin/env bash
# The same two-node cluster by hand, without the autoscaler. Run on each node in turn:
#   bash examples/cluster/launch.sh head              # on the rollout node
#   bash examples/cluster/launch.sh worker HEAD_IP    # on the train node
# Between the nodes, open: 6379 (GCS), 8265 (dashboard, for `ray job submit`),
# 10001-10100 and the node/object manager ports Ray picks, the worker port range
# (--min-worker-port/--max-worker-port), and the ports of the two rendezvous the job
# makes (DeepSpeed's and the weight transfer's: free ports on the learner's node, or
# sync.master_port), plus NCCL's own connections. Simplest: all TCP between the nodes,
# and nothing from elsewhere. The dashboard (jobs API) listens on loopback: submit jobs
# on the head, or through `ssh -L 8265:127.0.0.1:8265 HEAD`. DASHBOARD_HOST=0.0.0.0 opens
# it to the network: only behind a firewall that lets just your own machines reach 8265,
# with Ray's token authentication left on (the default in Ray 2.60).
set -euo pipefail
case "${1:-}" in
  head)   ray start --head --port=6379 --dashboard-host="${DASHBOARD_HOST:-127.0.0.1}" --resources='{"rollout_node": 8}' ;;
  worker) ray start --address="${2:?HEAD_IP}:6379" --resources='{"train_node": 8}' ;;
  *) echo "usage: $0 head | worker HEAD_IP" >&2; exit 2 ;;
esac

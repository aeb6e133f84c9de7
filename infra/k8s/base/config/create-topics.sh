#!/bin/bash
# Creates every topic the rsafe worker uses, with partitions, replication, retention and cleanup
# policy, before the workers start (they run with create_topics: false). Idempotent: existing topics
# are kept, and a topic whose partition count or cleanup policy differs from the list is reported
# (exit 1): Kafka cannot shrink a topic, and growing one moves keys to other partitions, which
# breaks the co-partitioning of the feedback join (docs/STREAM.md "Topics").
#
# Runs in the official apache/kafka image (kafka-topics.sh): the topic-init job of
# infra/k8s/base/topic-init.yaml and the topic-init service of infra/compose.yaml.
#
#   BOOTSTRAP_SERVERS    host:port[,host:port]                  (default kafka:9092)
#   REPLICATION_FACTOR   3 on a cluster, 1 on the compose broker (default 3)
#   MIN_INSYNC_REPLICAS  2 on a cluster, 1 on the compose broker (default 2)
#   COMMAND_CONFIG       client properties for SASL/SSL (kafka-topics.sh --command-config), optional
#
# The list below must match rsafe.stream.worker.topic_specs(load_config(config/worker.yaml)):
# names, partitions and the configs the worker itself would set (tests/test_deploy.py checks it).
# All keyed-by-event-id topics of the feedback join (audit, feedback, reports, disagreements,
# review, ticks, changelogs) have outputs.partitions partitions.
set -euo pipefail

BOOTSTRAP_SERVERS="${BOOTSTRAP_SERVERS:-kafka:9092}"
REPLICATION_FACTOR="${REPLICATION_FACTOR:-3}"
MIN_INSYNC_REPLICAS="${MIN_INSYNC_REPLICAS:-2}"
COMMAND_CONFIG="${COMMAND_CONFIG:-}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"

# name                               partitions  configs (key=value pairs separated by ";"; "-": broker defaults)
read -r -d '' TOPICS <<'TOPICS' || true
chat.general                         12  retention.ms=604800000
chat.kids                            12  retention.ms=604800000
chat.forum                           12  retention.ms=604800000
chat.general.verdicts                12  retention.ms=604800000
chat.kids.verdicts                   12  retention.ms=604800000
chat.forum.verdicts                  12  retention.ms=604800000
rsafe.audit                          12  cleanup.policy=compact
rsafe.dlq                            12  retention.ms=2592000000
rsafe.policies                       1   cleanup.policy=compact
rsafe.feedback                       12  retention.ms=2592000000
rsafe.reports                        12  retention.ms=2592000000
rsafe.disagreements                  12  cleanup.policy=compact,delete;retention.ms=7776000000
rsafe.review                         12  retention.ms=2592000000
rsafe-guard-feedback-ticks           12  retention.ms=3600000
rsafe-guard-decisions-changelog      12  cleanup.policy=compact
rsafe-guard-pending-changelog        12  cleanup.policy=compact
rsafe-guard-labels-changelog         12  cleanup.policy=compact
rsafe-guard-stats-changelog          12  cleanup.policy=compact
rsafe-guard-expired-changelog        12  cleanup.policy=compact
rsafe.models                         1   cleanup.policy=compact
TOPICS

args=(--bootstrap-server "$BOOTSTRAP_SERVERS")
if [ -n "$COMMAND_CONFIG" ]; then
  args+=(--command-config "$COMMAND_CONFIG")
fi

echo "waiting for the broker at $BOOTSTRAP_SERVERS ..."
for attempt in $(seq 1 60); do
  if "$KAFKA_BIN/kafka-topics.sh" "${args[@]}" --list >/dev/null 2>&1; then
    break
  fi
  if [ "$attempt" = 60 ]; then
    echo "ERROR: the broker at $BOOTSTRAP_SERVERS did not answer in 5 minutes" >&2
    exit 1
  fi
  sleep 5
done

status=0
while read -r name partitions configs; do
  case "$name" in ''|'#'*) continue ;; esac
  cfg=(--config "min.insync.replicas=$MIN_INSYNC_REPLICAS")
  if [ "$configs" != "-" ]; then
    IFS=';' read -r -a pairs <<<"$configs"
    for pair in "${pairs[@]}"; do
      cfg+=(--config "$pair")
    done
  fi
  "$KAFKA_BIN/kafka-topics.sh" "${args[@]}" --create --if-not-exists --topic "$name" \
    --partitions "$partitions" --replication-factor "$REPLICATION_FACTOR" "${cfg[@]}"
  described="$("$KAFKA_BIN/kafka-topics.sh" "${args[@]}" --describe --topic "$name")"
  described="${described%%$'\n'*}"   # the topic line (not "| head": SIGPIPE under pipefail)
  actual="$(printf '%s\n' "$described" | grep -o 'PartitionCount: *[0-9]*' | grep -o '[0-9]*$' || true)"
  if [ "$actual" != "$partitions" ]; then
    echo "ERROR: topic $name has ${actual:-?} partitions, expected $partitions" >&2
    status=1
  fi
  case "$configs" in
    *cleanup.policy=compact*)
      if ! printf '%s\n' "$described" | grep -q 'cleanup.policy=compact'; then
        echo "ERROR: topic $name exists without cleanup.policy=compact" >&2
        status=1
      fi ;;
  esac
done <<<"$TOPICS"

if [ "$status" = 0 ]; then
  echo "all topics present"
fi
exit "$status"

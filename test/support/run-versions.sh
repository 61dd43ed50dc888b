#!/usr/bin/env bash
# Runs the integration and end-to-end suites against each RabbitMQ version in turn (default:
# 3.10 4.0 4.3; or the versions given as arguments; or side by side, below), each run named in
# the output, and a summary at the end. Exits 1 when any run failed; every run goes ahead
# regardless.
#
#   3.10  the machine's own broker on 5672, the machine's rabbitmqctl
#   4.0   the rabbitmq-versions kit's node on 5673, its bin/4.0 wrappers first on PATH
#   4.3   the kit's node on 5675, its bin/4.3 wrappers first on PATH
#
# With a version's wrappers first on PATH, a fault test's `rabbitmqctl stop_app` stops that
# version's broker and no other. The kit (../shared/rabbitmq-versions beside the clone, or
# RABBITMQ_VERSIONS_KIT) must have started the 4.x brokers: `setup all`, `start 4.0`,
# `start 4.3`. This script starts nothing.
#
# --side-by-side runs the versions at once, each in a lane of its own that runs its two
# suites in turn, and prints each lane's output when it ends (in lane order). The suites spend most of
# their time waiting (on a silence, a task's time limit, a broker coming back): on two
# cores the integration suite keeps about a third of one busy, end-to-end two thirds. So
# the lanes take the suites in opposite orders, to overlap the lighter with the heavier.
# Each lane has its own broker, rabbitmqctl and queues, and no test uses a fixed port.
set -uo pipefail
cd "$(dirname "$0")/../.."

KIT=${RABBITMQ_VERSIONS_KIT:-$PWD/../shared/rabbitmq-versions}
SIDE_BY_SIDE=
if [ "${1:-}" = --side-by-side ]; then SIDE_BY_SIDE=1; shift; fi
if [ "$#" -gt 0 ]; then VERSIONS=("$@"); else VERSIONS=(3.10 4.0 4.3); fi

port_of() {
  case "$1" in
    3.10) echo 5672 ;;
    4.0) echo 5673 ;;
    4.3) echo 5675 ;;
  esac
}
for version in "${VERSIONS[@]}"; do
  if [ -z "$(port_of "$version")" ]; then
    echo "run-versions: unknown version $version (3.10, 4.0 or 4.3)" >&2
    exit 2
  fi
  if [ "$version" != 3.10 ] && [ ! -x "$KIT/bin/$version/rabbitmqctl" ]; then
    echo "run-versions: no kit at $KIT (set RABBITMQ_VERSIONS_KIT)" >&2
    exit 2
  fi
done

# One version: its suites in the order given, each named in the output; one summary line
# per suite on fd 9 (closed for the suites). Returns 1 when any failed.
run_version() {
  local version=$1 port path actual url suite start result failed=0
  shift
  port=$(port_of "$version")
  path=$PATH
  [ "$version" = 3.10 ] || path=$KIT/bin/$version:$PATH
  url=amqp://testuser:testuser@127.0.0.1:$port/
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    printf '\n== RabbitMQ %s: nothing listens on 127.0.0.1:%s\n' "$version" "$port"
    [ "$version" = 3.10 ] || echo "   start it with: $KIT/start $version"
    for suite in "$@"; do echo "RabbitMQ $version  $suite  NOT RUN (no broker)" >&9; done
    return 1
  fi
  actual=$(PATH=$path rabbitmqctl version 2>/dev/null || echo '?')
  for suite in "$@"; do
    printf '\n== RabbitMQ %s (%s, AMQP_URL %s, rabbitmqctl %s): %s\n' \
      "$version" "$actual" "$url" "$(PATH=$path command -v rabbitmqctl || echo none)" "$suite"
    start=$SECONDS
    if PATH=$path AMQP_URL=$url npm run --silent "test:$suite" 9>&-; then
      result=pass
    else
      result=FAIL
      failed=1
    fi
    echo "RabbitMQ $version  $suite  $result  $((SECONDS - start)) s" >&9
  done
  return "$failed"
}

summary=$(mktemp)
trap 'rm -f "$summary" "$summary".lane*' EXIT
failed=0
if [ -z "$SIDE_BY_SIDE" ]; then
  for version in "${VERSIONS[@]}"; do
    run_version "$version" integration e2e 9>>"$summary" || failed=1
  done
else
  declare -a lanes=()
  # Each lane in a process group of its own (job control), so that an interrupt can stop a
  # lane with its npm and node processes, and nothing else.
  set -m
  lane=0
  for version in "${VERSIONS[@]}"; do
    if [ $((lane % 2)) = 0 ]; then order=(integration e2e); else order=(e2e integration); fi
    run_version "$version" "${order[@]}" >"$summary.lane$lane" 2>&1 9>>"$summary.lane$lane.summary" &
    lanes+=("$!")
    lane=$((lane + 1))
  done
  # Interrupted (Ctrl-C, a CI timeout): what the lanes wrote so far, and the lanes stopped.
  trap 'for f in "$summary".lane?; do cat "$f"; done; for pid in "${lanes[@]}"; do kill -- -"$pid" 2>/dev/null; done; exit 130' INT TERM
  for i in "${!lanes[@]}"; do
    wait "${lanes[$i]}" || failed=1
    printf '\n== lane %s (RabbitMQ %s): its output\n' "$i" "${VERSIONS[$i]}"
    cat "$summary.lane$i"
    cat "$summary.lane$i.summary" >>"$summary"
  done
fi

printf '\n== RabbitMQ versions: summary\n'
cat "$summary"
exit "$failed"

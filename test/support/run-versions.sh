#!/usr/bin/env bash
# Runs the integration and end-to-end suites against each RabbitMQ version in turn (default:
# 3.10 4.0 4.3; or the versions given as arguments), one suite at a time, each run named in
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
set -uo pipefail
cd "$(dirname "$0")/../.."

KIT=${RABBITMQ_VERSIONS_KIT:-$PWD/../shared/rabbitmq-versions}
SUITES=(integration e2e)
if [ "$#" -gt 0 ]; then VERSIONS=("$@"); else VERSIONS=(3.10 4.0 4.3); fi

declare -a summary=()
failed=0

for version in "${VERSIONS[@]}"; do
  case "$version" in
    3.10) port=5672 path=$PATH ;;
    4.0) port=5673 path=$KIT/bin/4.0:$PATH ;;
    4.3) port=5675 path=$KIT/bin/4.3:$PATH ;;
    *) echo "run-versions: unknown version $version (3.10, 4.0 or 4.3)" >&2; exit 2 ;;
  esac
  if [ "$version" != 3.10 ] && [ ! -x "$KIT/bin/$version/rabbitmqctl" ]; then
    echo "run-versions: no kit at $KIT (set RABBITMQ_VERSIONS_KIT)" >&2
    exit 2
  fi
  url=amqp://testuser:testuser@127.0.0.1:$port/
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    printf '\n== RabbitMQ %s: nothing listens on 127.0.0.1:%s\n' "$version" "$port"
    [ "$version" = 3.10 ] || echo "   start it with: $KIT/start $version"
    for suite in "${SUITES[@]}"; do summary+=("RabbitMQ $version  $suite  NOT RUN (no broker)"); done
    failed=1
    continue
  fi
  actual=$(PATH=$path rabbitmqctl version 2>/dev/null || echo '?')
  for suite in "${SUITES[@]}"; do
    printf '\n== RabbitMQ %s (%s, AMQP_URL %s, rabbitmqctl %s): %s\n' \
      "$version" "$actual" "$url" "$(PATH=$path command -v rabbitmqctl || echo none)" "$suite"
    start=$SECONDS
    if PATH=$path AMQP_URL=$url npm run --silent "test:$suite"; then
      result=pass
    else
      result=FAIL
      failed=1
    fi
    summary+=("RabbitMQ $version  $suite  $result  $((SECONDS - start)) s")
  done
done

printf '\n== RabbitMQ versions: summary\n'
printf '%s\n' "${summary[@]}"
exit "$failed"

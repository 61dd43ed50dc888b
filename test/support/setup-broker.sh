#!/usr/bin/env bash
# `npm run setup:broker`: the test user that docker compose creates (testuser/testuser, all permissions on
# the vhost /) on the local RabbitMQ, idempotently: created when missing, its password
# reset, its permissions set. What the tests' AMQP_URL (by default
# amqp://testuser:testuser@localhost:5672/) needs on a stock RabbitMQ, which has only
# guest. .ci/run runs this too. It uses the rabbitmqctl first on PATH, which usually
# needs root (sudo npm run setup:broker) or the broker's Erlang cookie.
set -euo pipefail

say() { printf 'setup:broker: %s\n' "$*" >&2; }

if ! command -v rabbitmqctl >/dev/null 2>&1; then
  say 'no rabbitmqctl on PATH: install RabbitMQ (Debian/Ubuntu: apt-get install rabbitmq-server) and start it (rabbitmq-server -detached)'
  exit 1
fi
if ! users=$(rabbitmqctl list_users --quiet 2>/dev/null); then
  say "rabbitmqctl cannot reach the local RabbitMQ node: is it running (rabbitmq-server -detached)? As root? (sudo npm run setup:broker)"
  exit 1
fi
if ! awk '{print $1}' <<<"$users" | grep -qx testuser; then
  rabbitmqctl add_user testuser testuser
fi
rabbitmqctl change_password testuser testuser >/dev/null
rabbitmqctl set_permissions -p / testuser '.*' '.*' '.*'
say 'testuser/testuser has all permissions on / (AMQP_URL amqp://testuser:testuser@localhost:5672/)'

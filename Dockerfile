# syntax=docker/dockerfile:1
# amqp-concurrency: Node.js 24 LTS runs the TypeScript sources directly (type stripping),
# so there is no build stage: one stage installs the production dependencies, one adds
# the dev dependencies for the test service, and the runtime copies only what runs.

FROM node:24-bookworm-slim AS base
WORKDIR /app
# tini as PID 1: it forwards SIGTERM to the master and reaps killed workers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

FROM base AS deps
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

# `docker compose run --rm test`: the whole suite against the compose RabbitMQ.
FROM base AS test
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json biome.json ./
COPY src ./src
COPY tasks ./tasks
COPY test ./test
USER node
CMD ["npm", "test"]

FROM base AS runtime
ENV NODE_ENV=production \
    HTTP_PORT=8080
COPY --from=deps /app/node_modules ./node_modules
COPY package.json package-lock.json ./
COPY src ./src
COPY tasks ./tasks
USER node
EXPOSE 8080
STOPSIGNAL SIGTERM
# Liveness needs no extra tools: Node's own fetch.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.HTTP_PORT||8080)+'/health/live').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["/usr/bin/tini", "--", "node", "src/cli.ts"]

# amqp-concurrency: Node.js 24 LTS runs the TypeScript sources directly (type stripping),
# so there is no build stage: one stage installs the production dependencies, the runtime
# copies only what runs, and the last stage adds the dev dependencies for the test service.
# The runtime comes before the test stage, so a builder that walks the stages in order
# (the classic builder, Compose v1) stops at `runtime` and never builds the test stage.

FROM node:24-bookworm-slim AS base
WORKDIR /app
# dumb-init as PID 1, in single-child mode (-c): it reaps orphans and forwards every
# signal to the master alone, SIGTTIN and SIGTTOU included (tini ignores those two, so
# `docker kill --signal TTIN` would never resize the pool under tini).
# Single-child mode, not dumb-init's process-group mode: in that mode TTIN and TTOU stop
# the whole group (job control) instead of reaching the master. What a task starts is
# killed anyway: each worker leads a process group of its own, and the master kills that
# group at a timeout, a recycle and a drain.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dumb-init \
 && rm -rf /var/lib/apt/lists/*
# glibc's malloc maps each block of 128 KiB or more on its own and unmaps it when freed. By
# default it raises that threshold to the size of the largest block freed so far, so after
# the first large message body the rest come from its heap, which it keeps: after a burst
# of 4 MiB bodies the master stayed 90 to 120 MiB over its idle size, against 30 to 90 MiB
# with the threshold fixed (README "Limits and trust", Memory). Small allocations, all a tiny task
# makes, are unchanged.
ENV MALLOC_MMAP_THRESHOLD_=131072

FROM base AS deps
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

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
# Liveness needs no extra tools: Node's own fetch. The service is ready in about a second;
# a short interval makes the container healthy soon after start. `--start-interval` would
# check often only during the start period, but Docker Engine before 25 (and its classic
# builder, e.g. dockerd 20.10) rejects the flag, so the interval itself is kept short.
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.HTTP_PORT||8080)+'/health/live').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
ENTRYPOINT ["/usr/bin/dumb-init", "-c", "--", "node", "src/cli/main.ts"]

# `docker compose run --rm test`: the suite against the compose RabbitMQ. procps for the
# tests that look for processes with `ps`; dumb-init as PID 1 reaps the workers the tests
# orphan on purpose (a killed master).
FROM base AS test
RUN apt-get update \
 && apt-get install -y --no-install-recommends procps \
 && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json biome.json Dockerfile docker-compose.yml .dockerignore README.md ./
COPY src ./src
COPY tasks ./tasks
COPY test ./test
COPY deploy ./deploy
# docs/: the architecture test checks that the code cites only documents that exist.
COPY docs ./docs
USER node
ENTRYPOINT ["/usr/bin/dumb-init", "-c", "--"]
CMD ["npm", "test"]

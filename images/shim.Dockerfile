# syntax=docker/dockerfile:1
# The Sluice node shim. Build from the repository root:
#   docker build -f images/shim.Dockerfile -t sluice-shim:0.1.0 .
# (or `cargo xtask images`). The eBPF object is compiled by node-shim/build.rs (clang) and
# embedded in the binary. Runtime: Debian slim with nftables (the shim applies its table with
# `nft -f`; links, addresses, routes and rules go over netlink).
# It runs as root with only the capabilities the chart grants (NET_ADMIN, BPF, PERFMON): pinning
# in bpffs and writing network sysctls need uid 0; nothing else in the image runs.

# Any stable Rust at or above the workspace's rust-version; "1" is the newest stable.
ARG RUST_VERSION=1
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang llvm libbpf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-shim \
    && install -D -m 0755 target/release/sluice-shim /out/sluice-shim

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/sluice-shim /usr/local/bin/sluice-shim
USER 0:0
EXPOSE 9473
ENTRYPOINT ["/usr/local/bin/sluice-shim"]
CMD ["run"]

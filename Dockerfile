# kube-nsg: one image for the controller (Deployment) and the node agent (DaemonSet).
# Build: docker build -t kube-nsg:dev .   (tests/kind/e2e.sh does this for kind)
FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
# make: tikv-jemalloc-sys builds jemalloc from its C sources.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src src
# Only the binary's own sources are needed; build it alone.
RUN cargo build --release --locked --bin kube-nsg \
 && strip target/release/kube-nsg

FROM debian:bookworm-slim
# nft: for `nft list table inet kube-nsg` on a node; the agent itself talks netlink, and runs
# nft only for a batch too large for its socket. Nothing else is installed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kube-nsg /usr/local/bin/kube-nsg
# The controller runs as this user; the agent's pod spec runs it as root with NET_ADMIN.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kube-nsg"]

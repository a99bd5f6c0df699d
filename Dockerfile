# tokengate container image: a release build, then only the binary on distroless.
#   docker build -t tokengate:0.1.0 .
#   docker run --rm -p 50051:50051 tokengate:0.1.0 serve

# Build stage: the same toolchain as CI, the same release profile that ships.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so editing src/ reuses the cached dependency layer.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tokengate

# Final stage: glibc, CA certificates and tzdata only; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tokengate /usr/local/bin/tokengate
# distroless "nonroot": a numeric UID/GID, so runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=2s \
    CMD ["/usr/local/bin/tokengate", "health-check", "--addr", "http://127.0.0.1:50051"]
ENTRYPOINT ["/usr/local/bin/tokengate"]
CMD ["serve"]

# syntax=docker/dockerfile:1
# Build: docker build -t mvrefresh .
# The base images are arguments (defaults: the official ones) so that a machine with no registry
# can build from images it made itself (scripts/image-test).
ARG BUILD_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
COPY config.toml ./
RUN cargo build --release --locked && strip target/release/mvrefresh

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/mvrefresh /usr/local/bin/mvrefresh
COPY sql /usr/share/mvrefresh/sql
COPY config.toml /etc/mvrefresh/config.toml
USER 65532:65532
ENV MVREFRESH_CONFIG=/etc/mvrefresh/config.toml
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/mvrefresh"]
CMD ["run"]

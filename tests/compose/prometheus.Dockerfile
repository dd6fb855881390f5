# Prometheus from Debian's package, standing in for the official prom/prometheus image on
# machines that cannot pull it (used by tests/compose/docker-compose.test.yml only).
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
ENTRYPOINT ["/usr/bin/prometheus"]

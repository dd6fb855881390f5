#!/usr/bin/env python3
"""Writes grafana/dashboards/nym-node.json, the nym-node overview dashboard.

The dashboard is generated so every panel follows the same conventions (datasource, units,
the $instance filter); edit the PANELS table and run this script. tests/dashboards.rs checks
the result: its structure, and every query evaluated against a real Prometheus that scraped
live nodes.
"""
import json
import pathlib

DS = {"type": "prometheus", "uid": "prometheus"}
SEL = 'instance=~"$instance"'

# (row title, [(panel title, unit, [(legend, expr)], description)])
PANELS = [
    ("Traffic", [
        ("Packets received", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_packets_received_total{{{SEL}}}[1m]))')],
         "Sphinx packets accepted from peers and clients, per second."),
        ("Packets forwarded", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_packets_forwarded_total{{{SEL}}}[1m]))')],
         "Packets handed to an egress peer's socket, per second."),
        ("Payloads delivered (gateways)", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_packets_delivered_total{{{SEL}}}[1m]))')],
         "Final-hop payloads stored for clients, per second."),
        ("Drops by reason", "pps", [("{{reason}}", f'sum by (reason) (rate(nym_node_packets_dropped_total{{{SEL}}}[1m])) > 0')],
         "Every drop counts one reason; an empty panel is a healthy node."),
        ("Drop ratio", "percentunit", [("{{instance}}", f'sum by (instance) (rate(nym_node_packets_dropped_total{{{SEL}}}[5m])) / clamp_min(sum by (instance) (rate(nym_node_packets_received_total{{{SEL}}}[5m])), 1e-9)')],
         "Dropped / received over 5 minutes."),
        ("SURB-ACKs sent (gateways)", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_gateway_acks_sent_total{{{SEL}}}[1m]))')],
         "Acknowledgements sent back for stored payloads, messages and loop cover alike."),
    ]),
    ("Where packets wait", [
        ("Stage latency p99", "s", [("{{stage}}", f'histogram_quantile(0.99, sum by (le, stage) (rate(nym_node_packet_stage_seconds_bucket{{{SEL}}}[5m])))')],
         "forwarder_queue: ingress to unwrapped; delay_overrun: late release; egress_queue: release to socket; socket_write: one flush."),
        ("Stage latency p50", "s", [("{{stage}}", f'histogram_quantile(0.5, sum by (le, stage) (rate(nym_node_packet_stage_seconds_bucket{{{SEL}}}[5m])))')],
         "Median of the same stages."),
        ("Held delay (requested)", "s", [
            ("p50", f'histogram_quantile(0.5, sum by (le) (rate(nym_node_packet_held_delay_seconds_bucket{{{SEL}}}[5m])))'),
            ("p99", f'histogram_quantile(0.99, sum by (le) (rate(nym_node_packet_held_delay_seconds_bucket{{{SEL}}}[5m])))')],
         "Per-hop delays packets asked this node for."),
        ("Delay queue", "short", [("{{instance}}", f'sum by (instance) (nym_node_delay_queue_packets{{{SEL}}})')],
         "Packets held for their delay right now."),
        ("Sphinx queue", "short", [("{{instance}}", f'sum by (instance) (nym_node_sphinx_queue_packets{{{SEL}}})')],
         "Packets waiting for a Sphinx worker; near NYM_NODE_SPHINX_QUEUE the node sheds (overload)."),
        ("Released early at shutdown", "short", [("{{instance}}", f'sum by (instance) (increase(nym_node_packets_released_early_total{{{SEL}}}[1h]))')],
         "Held packets released before their due time by a draining node."),
    ]),
    ("Links", [
        ("Active connections", "short", [
            ("ingress {{instance}}", f'sum by (instance) (nym_node_network_active_ingress_mixnet_connections{{{SEL}}})'),
            ("egress {{instance}}", f'sum by (instance) (nym_node_network_active_egress_mixnet_connections{{{SEL}}})')],
         "Open Noise links."),
        ("Idle closes", "ops", [
            ("ingress", f'sum(rate(nym_node_network_idle_closed_ingress_mixnet_connections_total{{{SEL}}}[5m]))'),
            ("egress", f'sum(rate(nym_node_network_idle_closed_egress_mixnet_connections_total{{{SEL}}}[5m]))')],
         "Links closed for having no traffic for NYM_NODE_CONNECTION_IDLE_TIMEOUT."),
        ("Write timeouts and reconnects", "ops", [
            ("write timeouts", f'sum(rate(nym_node_network_egress_write_timeouts_total{{{SEL}}}[5m]))'),
            ("reconnects", f'sum(rate(nym_node_network_egress_reconnects_total{{{SEL}}}[5m]))')],
         "Slow or restarting peers."),
        ("Handshake failures", "ops", [("{{direction}} {{reason}}", f'sum by (direction, reason) (rate(nym_node_network_handshake_failures_total{{{SEL}}}[5m])) > 0')],
         "unknown_key: a peer outside the topology tried to link."),
        ("Refused connections", "ops", [("{{reason}}", f'sum by (reason) (rate(nym_node_network_refused_ingress_mixnet_connections_total{{{SEL}}}[5m]))')],
         "Ingress connections refused before the handshake."),
        ("DNS", "ops", [
            ("queries", f'sum(rate(nym_node_dns_queries_total{{{SEL}}}[5m]))'),
            ("cache hits", f'sum(rate(nym_node_dns_cache_hits_total{{{SEL}}}[5m]))'),
            ("failures {{reason}}", f'sum by (reason) (rate(nym_node_dns_failures_total{{{SEL}}}[5m]))'),
            ("evictions", f'sum(rate(nym_node_dns_evictions_total{{{SEL}}}[5m]))')],
         "Peer name lookups."),
    ]),
    ("Gateways", [
        ("Connected clients", "short", [("{{instance}}", f'sum by (instance) (nym_node_gateway_clients_connected{{{SEL}}})')],
         "Authenticated client sessions."),
        ("Mailbox", "short", [("{{instance}}", f'sum by (instance) (nym_node_gateway_mailbox_payloads{{{SEL}}})')],
         "Payloads stored for clients, waiting for their acknowledgement."),
        ("SURB-ACKs sent", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_gateway_acks_sent_total{{{SEL}}}[1m]))')],
         "Acknowledgements sent back for stored payloads."),
        ("Refused client sessions", "ops", [("{{instance}}", f'sum by (instance) (rate(nym_node_gateway_client_messages_refused_total{{{SEL}}}[5m]))')],
         "Bad signatures and malformed messages."),
    ]),
    ("Exit", [
        ("Open streams", "short", [("{{instance}}", f'sum by (instance) (nym_node_exit_streams_open{{{SEL}}})')],
         "Streams the exit's network requester has open to targets."),
        ("Streams opened and refused", "ops", [
            ("opened", f'sum(rate(nym_node_exit_streams_opened_total{{{SEL}}}[5m]))'),
            ("refused {{reason}}", f'sum by (reason) (rate(nym_node_exit_streams_refused_total{{{SEL}}}[5m]))')],
         "Refusals: the exit policy (policy_reject, internal_address, no_rule), resolve_failed, connect_failed, too_many_streams, capacity."),
        ("Exit bytes", "Bps", [("{{direction}}", f'sum by (direction) (rate(nym_node_exit_stream_bytes_total{{{SEL}}}[1m]))')],
         "Bytes relayed to targets and back."),
        ("Time to first byte", "s", [
            ("p50", f'histogram_quantile(0.5, sum by (le) (rate(nym_node_exit_time_to_first_byte_seconds_bucket{{{SEL}}}[5m])))'),
            ("p90", f'histogram_quantile(0.9, sum by (le) (rate(nym_node_exit_time_to_first_byte_seconds_bucket{{{SEL}}}[5m])))')],
         "From an open request reaching the exit to the target's first byte (includes the client's request crossing the mixnet)."),
    ]),
    ("Keys and replay protection", [
        ("Sphinx key epoch", "short", [
            ("epoch {{instance}}", f'nym_node_sphinx_key_epoch{{{SEL}}}'),
            ("retired in 1h {{instance}}", f'increase(nym_node_sphinx_keys_retired_total{{{SEL}}}[1h])')],
         "The key epoch each node is in, and keys it deleted with their filters; nodes should agree on the epoch."),
        ("Replay filter memory", "bytes", [("{{instance}}", f'nym_node_replay_filter_bytes{{{SEL}}}')],
         "Bytes of the replay filters of every live key (mapped lazily: resident only as they fill)."),
        ("Replay filter fill", "percentunit", [("{{instance}}", f'nym_node_replay_filter_fill_ratio{{{SEL}}}')],
         "Packets recorded this epoch over what one filter stage is sized for; above 100% the filter grows a stage (raise NYM_NODE_REPLAY_FILTER_RATE)."),
        ("Expired-key and replay drops", "pps", [("{{reason}}", f'sum by (reason) (rate(nym_node_packets_dropped_total{{reason=~"replay|expired_key",{SEL}}}[5m]))')],
         "expired_key: packets for a key past its overlap (a client with a stale topology, or an old capture replayed)."),
    ]),
    ("Process", [
        ("CPU", "percentunit", [("{{instance}}", f'rate(nym_node_process_cpu_seconds_total{{{SEL}}}[1m])')],
         "Cores used by the node process."),
        ("Resident memory", "bytes", [("{{instance}}", f'nym_node_process_resident_memory_bytes{{{SEL}}}')],
         "RSS of the node process."),
        ("Open file descriptors", "short", [
            ("open {{instance}}", f'nym_node_process_open_fds{{{SEL}}}'),
            ("limit {{instance}}", f'nym_node_process_max_fds{{{SEL}}}')],
         "Sockets and files; the limit caps connections."),
        ("Async runtime", "short", [
            ("alive tasks {{instance}}", f'nym_node_tokio_alive_tasks{{{SEL}}}'),
            ("global queue {{instance}}", f'nym_node_tokio_global_queue_depth{{{SEL}}}'),
            ("workers {{instance}}", f'nym_node_tokio_workers{{{SEL}}}')],
         "Tasks in the tokio runtime."),
        ("Topology", "short", [
            ("nodes {{instance}}", f'nym_node_topology_nodes{{{SEL}}}'),
            ("reload errors {{instance}}", f'increase(nym_node_topology_reloads_total{{result="error",{SEL}}}[10m])')],
         "Nodes in the current document; a failed reload keeps the last good one."),
        ("Build", "short", [("{{instance}} {{version}} {{commit}}", f'nym_node_build_info{{{SEL}}}')],
         "Version and commit per node."),
    ]),
]


def panel(pid, title, unit, targets, description, x, y):
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(targets)
        ],
    }


def dashboard():
    panels, pid, y = [], 1, 0
    for row_title, row in PANELS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets, description) in enumerate(row):
            panels.append(panel(pid, title, unit, targets, description, (i % 3) * 8, y + (i // 3) * 8))
            pid += 1
        y += ((len(row) + 2) // 3) * 8
    return {
        "uid": "nym-node-overview",
        "title": "nym-node overview",
        "description": "Traffic, drops, latency by stage, links, gateways and process health of nym-node.",
        "tags": ["nym-node", "mixnet"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{
            "name": "instance",
            "label": "Node",
            "type": "query",
            "datasource": DS,
            "query": {"query": "label_values(nym_node_build_info, instance)", "refId": "instance"},
            "definition": "label_values(nym_node_build_info, instance)",
            "includeAll": True,
            "multi": True,
            "allValue": ".+",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "refresh": 2,
            "sort": 1,
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    out = pathlib.Path(__file__).resolve().parent.parent / "grafana" / "dashboards" / "nym-node.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")

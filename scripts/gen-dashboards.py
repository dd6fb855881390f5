#!/usr/bin/env python3
"""Writes the Grafana dashboards of grafana/dashboards/: `nym-node` (one node at a time:
traffic, waits, links, gateways, exit, keys, process) and `nym-network` (the mixnet as a
whole: serving nodes per layer, which node lags the directory, where an upgrade is, end-to-end
delivery, the operator).

Edit the tables below and run this script; tests/dashboards.rs checks that the committed JSON
is what it writes, checks its structure, and evaluates every query against a real Prometheus
that scraped a localnet, a prober and the operator.

Why plain Python and not Grafana's grafana-foundation-sdk (PyPI): the SDK builds the same
JSON through typed builders but validates nothing (its defaults leave `refId` empty, a stat
panel's `reduceOptions.calcs` empty and `schemaVersion` at 36, so one must know Grafana's
model anyway), and it is epoch-versioned with several releases a month, a moving dependency
for CI to install. Five small panel constructors here keep every panel on the same
conventions (datasource, units, descriptions, variables), need only the standard library,
and the tests check what they produce.
"""
import json
import pathlib

DS = {"type": "prometheus", "uid": "prometheus"}
SEL = 'instance=~"$instance"'
NS = 'namespace=~"$namespace"'
NODE_UID = "nym-node-overview"
NETWORK_UID = "nym-network"
# Both dashboards carry this tag; each links to the others by it.
FAMILY_TAG = "nym-mixnet"

# nym-node: (row title, [(panel title, unit, [(legend, expr)], description)]), all time series.
NODE_PANELS = [
    ("Traffic", [
        ("Packets received", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_packets_received_total{{{SEL}}}[$__rate_interval]))')],
         "Sphinx packets accepted from peers and clients, per second."),
        ("Packets forwarded", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_packets_forwarded_total{{{SEL}}}[$__rate_interval]))')],
         "Packets handed to an egress peer's socket, per second."),
        ("Payloads delivered (gateways)", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_packets_delivered_total{{{SEL}}}[$__rate_interval]))')],
         "Final-hop payloads stored for clients, per second."),
        ("Drops by reason", "pps", [("{{reason}}", f'sum by (reason) (rate(nym_node_packets_dropped_total{{{SEL}}}[$__rate_interval])) > 0')],
         "Every drop counts one reason; an empty panel is a healthy node."),
        ("Drop ratio", "percentunit", [("{{instance}}", f'sum by (instance) (rate(nym_node_packets_dropped_total{{{SEL}}}[5m])) / clamp_min(sum by (instance) (rate(nym_node_packets_received_total{{{SEL}}}[5m])), 1e-9)')],
         "Dropped / received over 5 minutes."),
        ("SURB-ACKs sent (gateways)", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_gateway_acks_sent_total{{{SEL}}}[$__rate_interval]))')],
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
        ("Write timeouts, reconnects, failed connects", "ops", [
            ("write timeouts", f'sum(rate(nym_node_network_egress_write_timeouts_total{{{SEL}}}[5m]))'),
            ("reconnects", f'sum(rate(nym_node_network_egress_reconnects_total{{{SEL}}}[5m]))'),
            ("failed connects", f'sum(rate(nym_node_network_egress_connect_failures_total{{{SEL}}}[5m]))')],
         "Slow or restarting peers. A failed connect holds the peer's packets for the retry (up to 5 s)."),
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
        ("Registrations", "short", [
            ("registered {{instance}}", f'sum by (instance) (nym_node_gateway_registered_clients{{{SEL}}})'),
            ("{{outcome}} /min", f'sum by (outcome) (rate(nym_node_gateway_registrations_total{{{SEL}}}[5m])) * 60')],
         "Clients registered here (each paid a stamp once), and registrations per minute by outcome: registered, stamp_required (a new client told the price), expired (lapsed without a session). A surge of registered with the mailbox near its cap is someone buying identities."),
        ("SURB-ACKs sent", "pps", [("{{instance}}", f'sum by (instance) (rate(nym_node_gateway_acks_sent_total{{{SEL}}}[$__rate_interval]))')],
         "Acknowledgements sent back for stored payloads."),
        ("Client cover traffic", "pps", [
            ("dummy frames {{instance}}", f'sum by (instance) (rate(nym_node_gateway_client_dummy_frames_total{{{SEL}}}[$__rate_interval]))'),
            ("drop cover ended {{instance}}", f'sum by (instance) (rate(nym_node_gateway_drop_cover_total{{{SEL}}}[$__rate_interval]))')],
         "Dummy frames: sent to paced client sessions with nothing stored to fill their slot, the bandwidth constant-rate downstream costs (each frame 2,447 bytes); near zero with clients connected means their downstream is saturated and their payloads wait in the mailbox. Drop cover: clients' cover packets that ended here and were discarded."),
        ("Refused client sessions", "ops", [
            ("bad messages {{instance}}", f'sum by (instance) (rate(nym_node_gateway_client_messages_refused_total{{{SEL}}}[5m]))'),
            ("before authenticating: {{reason}}", f'sum by (reason) (rate(nym_node_gateway_client_connections_refused_total{{{SEL}}}[5m]))')],
         "Bad signatures and malformed messages; connections closed before they authenticated (evicted: idle, made room for a newer one)."),
    ]),
    ("Exit", [
        ("Open streams", "short", [("{{instance}}", f'sum by (instance) (nym_node_exit_streams_open{{{SEL}}})')],
         "Streams the exit's network requester has open to targets."),
        ("Streams opened and refused", "ops", [
            ("opened", f'sum(rate(nym_node_exit_streams_opened_total{{{SEL}}}[5m]))'),
            ("refused {{reason}}", f'sum by (reason) (rate(nym_node_exit_streams_refused_total{{{SEL}}}[5m]))')],
         "Refusals: the exit policy (policy_reject, internal_address, no_rule), resolve_failed, connect_failed, too_many_streams, capacity, rate_limited, too_many_clients."),
        ("Exit bytes", "Bps", [("{{direction}}", f'sum by (direction) (rate(nym_node_exit_stream_bytes_total{{{SEL}}}[$__rate_interval]))')],
         "Bytes relayed to targets and back."),
        ("Time to first byte", "s", [
            ("p50", f'histogram_quantile(0.5, sum by (le) (rate(nym_node_exit_time_to_first_byte_seconds_bucket{{{SEL}}}[5m])))'),
            ("p90", f'histogram_quantile(0.9, sum by (le) (rate(nym_node_exit_time_to_first_byte_seconds_bucket{{{SEL}}}[5m])))')],
         "From an open request reaching the exit to the target's first byte (includes the client's request crossing the mixnet)."),
    ]),
    ("IP packet router", [
        ("Router clients", "short", [("{{instance}}", f'sum by (instance) (nym_node_ipr_clients{{{SEL}}})')],
         "Clients of the exit's IP packet router holding addresses (nym-client tun). Near NYM_NODE_IPR_MAX_CLIENTS, newcomers take the leases of clients silent a minute, or are refused (pool_full)."),
        ("Router packets", "pps", [("{{direction}}", f'sum by (direction) (rate(nym_node_ipr_packets_total{{{SEL}}}[$__rate_interval]))')],
         "IP packets out of the node's uplink (to_internet) and back through the mixnet (to_clients)."),
        ("Router bytes", "Bps", [("{{direction}}", f'sum by (direction) (rate(nym_node_ipr_bytes_total{{{SEL}}}[$__rate_interval]))')],
         "Bytes of those packets."),
        ("Router refusals", "pps", [("{{reason}}", f'sum by (reason) (rate(nym_node_ipr_refused_total{{{SEL}}}[5m]))')],
         "Packets the router dropped and connects it refused: the exit policy (policy_reject, internal_address, no_rule), spoofed_source, rate_limited, malformed, no_lease, unknown_destination, queue_full, too_large; pool_full and busy for connects."),
    ]),
    ("Keys and replay protection", [
        ("Sphinx key epoch", "short", [
            ("epoch {{instance}}", f'nym_node_sphinx_key_epoch{{{SEL}}}'),
            ("retired in 1h {{instance}}", f'increase(nym_node_sphinx_keys_retired_total{{{SEL}}}[1h])'),
            ("state lost {{instance}}", f'increase(nym_node_replay_state_lost_total{{{SEL}}}[1h])'),
            ("tags recovered {{instance}}", f'increase(nym_node_replay_tags_recovered_total{{{SEL}}}[1h])')],
         "The key epoch each node is in; keys whose secrets it erased with their replay state; keys replaced at start because their replay state was gone (a lost data directory); replay tags read back from the journal at a start after an unclean stop (a crash or a kill)."),
        ("Replay journal", "s", [
            ("p50", f'histogram_quantile(0.5, sum by (le) (rate(nym_node_replay_journal_seconds_bucket{{{SEL}}}[5m])))'),
            ("p99", f'histogram_quantile(0.99, sum by (le) (rate(nym_node_replay_journal_seconds_bucket{{{SEL}}}[5m])))')],
         "Time to write (and flush, with NYM_NODE_REPLAY_JOURNAL_SYNC) one batch of replay tags before its packets go on."),
        ("Replay filter memory", "bytes", [("{{instance}}", f'nym_node_replay_filter_bytes{{{SEL}}}')],
         "Bytes of the replay filters of every live key (mapped lazily: resident only as they fill)."),
        ("Replay filter fill", "percentunit", [("{{instance}}", f'nym_node_replay_filter_fill_ratio{{{SEL}}}')],
         "Packets recorded this epoch over what one filter stage is sized for; above 100% the filter grows a stage (raise NYM_NODE_REPLAY_FILTER_RATE)."),
        ("Expired-key and replay drops", "pps", [("{{reason}}", f'sum by (reason) (rate(nym_node_packets_dropped_total{{reason=~"replay|expired_key|replay_journal",{SEL}}}[5m]))')],
         "expired_key: packets for a key past its overlap (a client with a stale topology, or an old capture replayed). replay_journal: packets dropped because their replay tags could not be written (a full or failing data disk)."),
    ]),
    ("Process", [
        ("CPU", "percentunit", [("{{instance}}", f'rate(nym_node_process_cpu_seconds_total{{{SEL}}}[$__rate_interval])')],
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
            ("nodes {{instance}}", f'sum by (instance) (nym_node_topology_nodes{{{SEL}}})'),
            ("serving {{instance}} (layer {{layer}})", f'max by (instance, layer) (nym_node_topology_serving{{{SEL}}})'),
            ("reload errors {{instance}}", f'increase(nym_node_topology_reloads_total{{result="error",{SEL}}}[10m])')],
         "Nodes in the current document, and whether it lists this node as serving (and in which layer); a failed reload keeps the last good one."),
        ("Topology revision", "none", [("{{instance}}", f'nym_node_topology_revision{{{SEL}}}')],
         "Revision of the document each node routes by; the nym-network dashboard compares it with the directory's."),
        ("Topology validity left", "s", [("{{instance}}", f'nym_node_topology_valid_until_timestamp_seconds{{{SEL}}} - time()')],
         "Time until the document each node routes by expires. Directories re-sign at half its validity; below zero the node still routes on its last good document."),
        ("Build", "short", [("{{instance}} {{version}} {{commit}}", f'nym_node_build_info{{{SEL}}}')],
         "Version and commit per node."),
    ]),
]



# nym-network. A mix node's layer is the one the directory gives it (nym_node_topology_serving
# carries it), joined onto its traffic counters as a label only (the factor is 1 whether the
# node serves or drains: a draining node's traffic still counts).
SERVING = f'max by (namespace, instance, pod, mode, layer) (nym_node_topology_serving{{{NS},layer=~"$layer"}})'
LAYER_OF = f'(0 * {SERVING} + 1)'
JOIN = "on (namespace, instance)"
# Keeps a per-node query to the nodes of the selected layers.
IN_LAYER = f"and on (namespace, instance) {SERVING}"
# Serving nodes per kind: the directory's count where an operator publishes (it knows of a
# withdrawal first), else the document the nodes loaded.
def serving_count(by, selector):
    return (f'max by ({by}) (nym_operator_topology_nodes{{{NS},serving="true",{selector}}}) or '
            f'max by ({by}) (nym_node_topology_nodes{{{NS},serving="true",{selector}}})')
# The newest revision anyone has: the directory's (nym_operator_topology_revision, where an
# operator publishes) or the newest a node loaded (a static or compose directory).
NEWEST = f'max by (namespace) ({{__name__=~"nym_node_topology_revision|nym_operator_topology_revision",{NS}}})'
PHASE_CODES = [("idle", 0, "green"), ("blocked", 1, "yellow"), ("withdrawing", 2, "blue"),
               ("replacing", 3, "purple"), ("halted", 4, "red")]
PHASE_EXPR = "max by (namespace) (" + " or ".join(
    f'nym_operator_rollout_phase{{phase="{name}",{NS}}} * {code}' for name, code, _ in PHASE_CODES) + ")"
NODE_LINK = {
    "title": "nym-node: ${__value.raw}",
    "url": f"/d/{NODE_UID}/{NODE_UID}?var-instance=${{__value.raw}}&${{__url_time_range}}",
}


def network_rows():
    return [
        ("Network", [
            stat("Serving mix nodes per layer", "short", [
                ("{{namespace}} layer {{layer}}", serving_count("namespace, layer", 'mode="mixnode",layer=~"$layer"'))],
                "Mix nodes the current document lists as serving, per layer (the operator's document, or the one the nodes loaded). Red below two: one node is the whole layer.",
                red_below=2),
            stat("Serving gateways", "short", [
                ("{{namespace}} {{mode}}", serving_count("namespace, mode", 'mode=~".+-gateway"'))],
                "Entry and exit gateways the document lists as serving.", red_below=1),
            stat("End-to-end delivery", "percentunit", [
                ("delivered", f'sum(increase(nym_client_probe_messages_total{{{NS},result="delivered"}}[15m])) / (sum(increase(nym_client_probe_messages_total{{{NS}}}[15m])) > 0)')],
                "Probe messages that came back through three mix layers over the last 15 minutes (nym-client probe --every, the traffic client of the compose testnet).",
                red_below=0.95),
            table("Nodes", [
                ("Serving", SERVING),
                ("Revision", f'max by (namespace, instance, pod) (nym_node_topology_revision{{{NS}}}) {IN_LAYER}'),
                ("Behind", f'max by (namespace, instance, pod) ({NEWEST} - on (namespace) group_right nym_node_topology_revision{{{NS}}} > bool 0) {IN_LAYER}'),
                ("Version", f'max by (namespace, instance, pod, version) (nym_node_build_info{{{NS}}}) {IN_LAYER}')],
                "Every node (pod, where Kubernetes runs it): its mode, the layer and serving state its loaded document gives it, that document's revision, and whether it lags the newest revision (Behind = 1). A node's instance opens its nym-node dashboard.",
                link_field="instance", hide=["Version"], exact=["Revision"], w=24, h=9),
            timeseries("Serving nodes by layer and mode", "short", [
                ("nodes: {{mode}} {{layer}}", f'max by (namespace, mode, layer) (nym_node_topology_nodes{{{NS},serving="true",layer=~"$layer"}})'),
                ("directory: {{mode}} {{layer}}", f'max by (namespace, mode, layer) (nym_operator_topology_nodes{{{NS},serving="true",layer=~"$layer"}})')],
                "Serving nodes over time, as the nodes loaded the document and as the operator published it (where an operator publishes)."),
            timeseries("Nodes behind the newest revision", "short", [
                ("{{namespace}}", f'count by (namespace) ({NEWEST} - on (namespace) group_right nym_node_topology_revision{{{NS}}} > 0) or sum by (namespace) (0 * nym_node_topology_revision{{{NS}}})')],
                "Nodes routing by an older document than the newest published; brief after each publication, lasting only when a node cannot reload."),
            timeseries("Topology revision", "none", [
                ("directory {{namespace}}", f'max by (namespace) (nym_operator_topology_revision{{{NS}}})'),
                ("{{instance}}", f'nym_node_topology_revision{{{NS}}}')],
                "The directory's published revision beside each node's loaded one."),
        ]),
        ("Upgrades", [
            state_timeline("Rollout phase", [("{{namespace}}", PHASE_EXPR)],
                "The operator's upgrade state machine per namespace: idle, blocked (waiting for pods out of service), withdrawing a pod, replacing it, halted (needs a human).",
                mappings=PHASE_CODES),
            table("Pod being upgraded", [
                ("Seconds on it", f'time() - max by (namespace, nymnode, pod, phase) (nym_operator_rollout_pod_started_timestamp_seconds{{{NS}}})')],
                "The pod the rollout is withdrawing or replacing, and for how long; empty when no upgrade is under way.",
                unit="s"),
            timeseries("Pods replaced", "short", [
                ("{{namespace}}", f'sum by (namespace) (increase(nym_operator_rollout_pods_replaced_total{{{NS}}}[1h]))')],
                "Pods deleted for their upgrade in the last hour, after withdrawal."),
            timeseries("Time per pod", "s", [
                ("p50", f'histogram_quantile(0.5, sum by (le) (increase(nym_operator_rollout_pod_duration_seconds_bucket{{{NS}}}[6h])))'),
                ("max bucket", f'histogram_quantile(1, sum by (le) (increase(nym_operator_rollout_pod_duration_seconds_bucket{{{NS}}}[6h])))'),
                ("mean", f'sum(increase(nym_operator_rollout_pod_duration_seconds_sum{{{NS}}}[6h])) / sum(increase(nym_operator_rollout_pod_duration_seconds_count{{{NS}}}[6h]))')],
                "From a pod's withdrawal to its replacement serving, over the last 6 hours; most of it is waiting for every node to load the withdrawal and for the largest per-hop delay."),
            table("Degraded NymNodes", [
                ("Degraded", f'max by (namespace, nymnode, reason) (nym_operator_nymnode_degraded{{{NS}}}) == 1')],
                "NymNodes whose Degraded condition is True, with its reason (kubectl describe nymnode NAME says more)."),
            timeseries("Operator events", "short", [
                ("{{type}} {{reason}}", f'sum by (type, reason) (increase(nym_operator_events_total{{{NS}}}[10m]))')],
                "Events the operator published in the last 10 minutes: Warnings are what Degraded says; PodReplaced marks each upgraded pod."),
        ]),
        ("Traffic", [
            timeseries("Packets per second by layer", "pps", [
                ("{{mode}} {{layer}}", f'sum by (mode, layer) (rate(nym_node_packets_received_total{{{NS}}}[$__rate_interval]) * {JOIN} group_left (layer) {LAYER_OF})')],
                "Sphinx packets received per mix layer and per gateway mode."),
            timeseries("End-to-end latency", "s", [
                ("p50", f'histogram_quantile(0.5, sum by (le) (rate(nym_client_probe_message_latency_seconds_bucket{{{NS}}}[5m])))'),
                ("p99", f'histogram_quantile(0.99, sum by (le) (rate(nym_client_probe_message_latency_seconds_bucket{{{NS}}}[5m])))')],
                "From a probe message's send to its return through three mix layers and two gateways (mostly the per-hop delays clients choose)."),
            timeseries("Probe messages", "ops", [
                ("{{result}}", f'sum by (result) (rate(nym_client_probe_messages_total{{{NS}}}[5m]))'),
                ("retransmissions", f'sum(rate(nym_client_probe_retransmissions_total{{{NS}}}[5m]))')],
                "Delivered and lost probe messages, and packets the prober had to send again."),
            timeseries("Drops by reason", "pps", [
                ("{{reason}}", f'sum by (reason) (rate(nym_node_packets_dropped_total{{{NS}}}[$__rate_interval])) > 0')],
                "Every drop in the network counts one reason; an empty panel is a healthy network."),
            timeseries("Drop ratio by layer", "percentunit", [
                ("{{mode}} {{layer}}", f'sum by (mode, layer) (rate(nym_node_packets_dropped_total{{{NS}}}[5m]) * {JOIN} group_left (mode, layer) {LAYER_OF}) / clamp_min(sum by (mode, layer) (rate(nym_node_packets_received_total{{{NS}}}[5m]) * {JOIN} group_left (layer) {LAYER_OF}), 1e-9)')],
                "Dropped / received over 5 minutes, per layer."),
            timeseries("Handshake failures", "ops", [
                ("{{reason}}", f'sum by (reason) (rate(nym_node_network_handshake_failures_total{{{NS}}}[5m])) > 0')],
                "unknown_key across the network: peers outside the topology, or a node that lags it."),
        ]),
        ("Operator", [
            timeseries("Reconciles", "ops", [
                ("{{result}}", 'sum by (result) (rate(nym_operator_reconciles_total[5m]))')],
                "NymNode reconciles by result; errors back off and are published as Warning events."),
            timeseries("Reconcile duration", "s", [
                ("p50", 'histogram_quantile(0.5, sum by (le) (rate(nym_operator_reconcile_duration_seconds_bucket[5m])))'),
                ("p99", 'histogram_quantile(0.99, sum by (le) (rate(nym_operator_reconcile_duration_seconds_bucket[5m])))')],
                "Time one reconcile takes (it fetches every pod's description)."),
            timeseries("Description failures", "ops", [
                ("rejected", 'sum(rate(nym_operator_descriptions_rejected_total[5m]))')],
                "Ready pods whose description could not be fetched, did not verify or claimed another mode: they stay out of service."),
            timeseries("Leader", "short", [
                ("{{instance}}", 'nym_operator_leader')],
                "1 on the replica holding the lease; only it reconciles."),
        ]),
    ]


NETWORK_VARIABLES = [
    {
        "name": "namespace",
        "label": "Namespace",
        "type": "query",
        "datasource": DS,
        "query": {"query": "label_values(nym_node_build_info, namespace)", "refId": "namespace"},
        "definition": "label_values(nym_node_build_info, namespace)",
        "includeAll": True,
        "multi": True,
        # Also matches targets without the label (a compose testnet has no namespaces).
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
    },
    {
        "name": "layer",
        "label": "Mix layer",
        "type": "custom",
        "query": "1,2,3",
        "options": [{"selected": False, "text": l, "value": l} for l in ("1", "2", "3")],
        "includeAll": True,
        "multi": True,
        # All: gateways too (they have no layer).
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    },
]

NODE_VARIABLES = [{
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
}]


# Panel constructors: each returns a panel without id and position (layout() adds them).

def targets_of(targets, instant=False):
    out = []
    for i, (legend, expr) in enumerate(targets):
        t = {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
        if instant:
            t.update({"instant": True, "range": False, "format": "table"})
        out.append(t)
    return out


def base(kind, title, description, unit, targets, instant=False):
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": targets_of(targets, instant),
    }


def timeseries(title, unit, targets, description):
    p = base("timeseries", title, description, unit, targets)
    p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return p


def stat(title, unit, targets, description, red_below):
    p = base("stat", title, description, unit, targets)
    p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": [
        {"color": "red", "value": None}, {"color": "green", "value": red_below}]}
    p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "none", "textMode": "value_and_name",
                    "orientation": "horizontal", "justifyMode": "auto"}
    p["h"] = 5
    return p


def table(title, targets, description, unit="short", link_field=None, hide=(), exact=(), w=8, h=8):
    """Instant queries merged into one row per series: each query's value is a column named
    by its legend. `hide`: legends whose value column is left out (the query is there for
    its labels); `exact`: legends whose values are shown whole (revisions, not 1.7 Tri)."""
    p = base("table", title, description, unit, targets, instant=True)
    value_field = {legend: "Value" if len(targets) == 1 else f"Value #{chr(ord('A') + i)}"
                   for i, (legend, _) in enumerate(targets)}
    p["transformations"] = [
        {"id": "merge", "options": {}},
        # organize matches the fields' names before its renaming.
        {"id": "organize", "options": {
            "excludeByName": {"Time": True, **{value_field[legend]: True for legend in hide}},
            "renameByName": {field: legend for legend, field in value_field.items()},
        }},
    ]
    for legend in exact:
        p["fieldConfig"]["overrides"].append({
            "matcher": {"id": "byName", "options": legend},
            "properties": [{"id": "unit", "value": "none"}, {"id": "decimals", "value": 0}],
        })
    if link_field:
        p["fieldConfig"]["overrides"].append({
            "matcher": {"id": "byName", "options": link_field},
            "properties": [{"id": "links", "value": [NODE_LINK]}],
        })
    p["options"] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    p["w"], p["h"] = w, h
    return p


def state_timeline(title, targets, description, mappings):
    p = base("state-timeline", title, description, "none", targets)
    p["fieldConfig"]["defaults"]["mappings"] = [{
        "type": "value",
        "options": {str(code): {"text": name, "color": color, "index": code}
                    for name, code, color in mappings},
    }]
    p["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
    p["options"] = {"showValue": "auto", "mergeValues": True, "rowHeight": 0.9,
                    "legend": {"showLegend": False}, "tooltip": {"mode": "single"}}
    return p


def node_rows():
    return [(row, [timeseries(title, unit, targets, description)
                   for title, unit, targets, description in panels])
            for row, panels in NODE_PANELS]


def layout(rows):
    """Ids and positions: each row's panels flow left to right, 24 columns wide."""
    panels, pid, y = [], 1, 0
    for row_title, row in rows:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        x, line_h = 0, 0
        for p in row:
            w, h = p.pop("w", 8), p.pop("h", 8)
            if x + w > 24:
                x, y, line_h = 0, y + line_h, 0
            panels.append({"id": pid, **p, "gridPos": {"h": h, "w": w, "x": x, "y": y}})
            pid, x, line_h = pid + 1, x + w, max(line_h, h)
        y += line_h
    return panels


def dashboard(uid, title, description, tags, variables, rows):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "links": [{"title": "Mixnet dashboards", "type": "dashboards", "tags": [FAMILY_TAG],
                   "asDropdown": False, "includeVars": False, "keepTime": True,
                   "targetBlank": False, "icon": "external link", "tooltip": "", "url": ""}],
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": layout(rows),
    }


DASHBOARDS = {
    "nym-node.json": lambda: dashboard(
        NODE_UID, "nym-node overview",
        "Traffic, drops, latency by stage, links, gateways and process health of nym-node.",
        ["nym-node", "mixnet", FAMILY_TAG], NODE_VARIABLES, node_rows()),
    "nym-network.json": lambda: dashboard(
        NETWORK_UID, "nym-network",
        "The mixnet as a whole: serving nodes per layer, nodes lagging the directory, upgrades, end-to-end delivery, the operator.",
        ["nym-network", "mixnet", FAMILY_TAG], NETWORK_VARIABLES, network_rows()),
}


if __name__ == "__main__":
    out = pathlib.Path(__file__).resolve().parent.parent / "grafana" / "dashboards"
    for name, build in DASHBOARDS.items():
        (out / name).write_text(json.dumps(build(), indent=2) + "\n")
        print(f"wrote {out / name}")

//! Forwarding throughput against the raw crypto floor, in one run.
//!
//! The node runs as its own process with default settings (one Sphinx worker per core).
//! This process sends it real Sphinx packets over Noise links as a topology peer and counts
//! them at a sink posing as the next hop, keeping at most 256 packets in flight (so the
//! node is saturated but sheds nothing). The node's forwarding throughput per core is
//! forwarded packets / CPU-seconds the node used; the floor is raw `sphinx-packet` unwrap
//! throughput of the same packets on one core, measured just before and just after (their mean is used).
//!
//! Prints `forward_vs_floor_ratio=R` (1.0 would be a node whose only cost is the unwrap).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nym_node::loadgen::{self, Pace, SendTimes, Setup, SinkStats};

const PACKETS: usize = 60_000;
const WARMUP: usize = 4_000;
/// In flight at most: no more than one connection's share of the node's intake queue
/// (`NYM_NODE_SPHINX_QUEUE_PER_CONNECTION`), so the node is kept busy but never sheds.
const WINDOW: u64 = 256;

fn main() {
    let exe =
        loadgen::node_binary().expect("nym-node binary next to the bench (cargo bench builds it)");
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::new(dir.path(), 4).unwrap();
    let build_start = Instant::now();
    let packets = setup.build_packets(PACKETS, 2);
    println!(
        "built {} packets in {:.1}s",
        packets.len(),
        build_start.elapsed().as_secs_f64()
    );
    let (floor_before, expected) = setup.unwrap_floor(&packets);

    let extra: Vec<(&str, String)> = std::env::var("BENCH_NODE_ENV")
        .ok()
        .map(|v| {
            v.split(",")
                .filter_map(|kv| kv.split_once("="))
                .map(|(k, v)| {
                    (
                        Box::leak(k.to_string().into_boxed_str()) as &str,
                        v.to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let node = setup.spawn_node(&exe, &extra).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        let sent_times = SendTimes::new(packets.len());
        let stats = Arc::new(SinkStats::default());
        let known: Vec<_> = [setup.node.public().noise_key].to_vec();
        let listener = setup.sink_listener().unwrap();
        tokio::spawn(loadgen::run_sink(
            listener,
            setup.sink.clone(),
            known,
            Arc::new(expected),
            sent_times.clone(),
            stats.clone(),
        ));
        let counter = Arc::new(AtomicU64::new(0));
        // Warm up: links open, caches fill.
        let warm = loadgen::prepare_links(&setup, &packets, 0..WARMUP)
            .await
            .unwrap();
        loadgen::send(
            warm,
            Pace::Window(WINDOW),
            sent_times.clone(),
            stats.clone(),
            counter.clone(),
        )
        .await;
        wait_for(&stats, WARMUP as u64, Duration::from_secs(20)).await;
        stats.take_latencies();

        let links = loadgen::prepare_links(&setup, &packets, WARMUP..packets.len())
            .await
            .unwrap();
        let cpu0 = node.cpu_time();
        let split0 = node.cpu_split();
        let t0 = Instant::now();
        let before = stats.received.load(Ordering::Relaxed);
        loadgen::send(
            links,
            Pace::Window(WINDOW),
            sent_times.clone(),
            stats.clone(),
            counter.clone(),
        )
        .await;
        wait_for(
            &stats,
            before + (packets.len() - WARMUP) as u64,
            Duration::from_secs(30),
        )
        .await;
        let wall = t0.elapsed();
        let cpu = node.cpu_time() - cpu0;
        let split1 = node.cpu_split();
        let forwarded = stats.received.load(Ordering::Relaxed) - before;
        (
            forwarded,
            wall,
            cpu,
            (split1.0 - split0.0, split1.1 - split0.1),
        )
    });
    let drops = loadgen::drops(setup.node_http, &setup.metrics_token);
    node.stop();
    // The floor again, after the run, on the same machine state; the mean of both is used.
    let (floor_after, _) = setup.unwrap_floor(&packets);
    let floor = (floor_before + floor_after) / 2;
    let floor_pps = 1.0 / floor.as_secs_f64();
    println!(
        "floor_unwrap_us_before={:.1} floor_unwrap_us_after={:.1}",
        floor_before.as_secs_f64() * 1e6,
        floor_after.as_secs_f64() * 1e6
    );
    let (forwarded, wall, cpu, (workers_cpu, runtime_cpu)) = result;
    println!("node_drops={drops:?}");
    let wall_pps = forwarded as f64 / wall.as_secs_f64();
    let cpu_per_packet = cpu.as_secs_f64() / forwarded.max(1) as f64;
    let per_core_pps = 1.0 / cpu_per_packet;
    println!("floor_unwrap_us={:.1}", floor.as_secs_f64() * 1e6);
    println!("floor_unwrap_pps_per_core={floor_pps:.0}");
    println!("node_forwarded={forwarded} in {:.2}s", wall.as_secs_f64());
    println!("node_forward_pps={wall_pps:.0}");
    println!("node_cpu_us_per_packet={:.1}", cpu_per_packet * 1e6);
    println!(
        "node_cpu_us_per_packet_split sphinx_workers={:.1} runtime={:.1}",
        workers_cpu.as_secs_f64() * 1e6 / forwarded.max(1) as f64,
        runtime_cpu.as_secs_f64() * 1e6 / forwarded.max(1) as f64
    );
    println!("node_forward_pps_per_core={per_core_pps:.0}");
    println!("forward_vs_floor_ratio={:.3}", per_core_pps / floor_pps);
}

async fn wait_for(stats: &SinkStats, n: u64, t: Duration) {
    let deadline = Instant::now() + t;
    while stats.received.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

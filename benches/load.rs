//! Load sweep: offered rate → forwarded rate, loss, CPU per packet and added latency, for one
//! mix node running as its own process (default settings), fed by 4 Noise links posing as
//! topology peers and drained by a counting sink posing as the next hop.
//!
//! Each step restarts the node with an empty data directory (so the same pre-built packets
//! can be replayed through a fresh replay filter: the node keeps its filters across
//! restarts), sends `rate x STEP` packets paced evenly over `STEP`, and waits for the
//! stragglers. The sweep finds the highest lossless rate, then measures the node at half of it
//! (latency) and at twice it (overload goodput), and prints:
//!
//! ```text
//! lossless_pps=...  cpu_us_per_packet=...  goodput_at_2x_ratio=...  floor_unwrap_us=...
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nym_node::loadgen::{self, Pace, SendTimes, Setup, SinkStats};
use nym_node::mixnet::sphinx::PacketBytes;

/// Length of the sending window of one step.
const STEP: Duration = Duration::from_secs(3);
/// Loss at or below this counts as lossless (a handful of packets in a 3 s step).
const LOSSLESS: f64 = 0.0005;

struct Step {
    offered: f64,
    /// Forwarded during the sending window, per second.
    goodput: f64,
    loss: f64,
    cpu_us: f64,
    p50: Duration,
    p99: Duration,
    drops: Vec<(String, u64)>,
    /// Mean time inside the node per stage (from its histograms), microseconds.
    stages: Vec<(String, f64)>,
}

/// 99th percentile (bucket upper bound) of the time from ingress to unwrapped, from a scrape.
fn stage_p99(text: &str, stage: &str) -> Option<f64> {
    let prefix = format!("nym_node_packet_stage_seconds_bucket{{stage=\"{stage}\",le=\"");
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix.as_str())?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((
                le.parse().unwrap_or(f64::INFINITY),
                count.trim().parse().ok()?,
            ))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, c)| *c >= total * 0.99)
        .map(|(le, _)| *le * 1e3)
}

/// Mean of each `nym_node_packet_stage_seconds` series, from a scrape.
fn stage_means(text: &str) -> Vec<(String, f64)> {
    let mut sums = std::collections::BTreeMap::new();
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        for (suffix, map) in [
            ("_sum{stage=\"", &mut sums),
            ("_count{stage=\"", &mut counts),
        ] {
            if let Some(rest) = line.strip_prefix(&format!("nym_node_packet_stage_seconds{suffix}"))
                && let Some((stage, value)) = rest.split_once("\"} ")
            {
                map.insert(
                    stage.to_string(),
                    value.trim().parse::<f64>().unwrap_or(0.0),
                );
            }
        }
    }
    sums.into_iter()
        .map(|(k, v)| {
            let c = counts.get(&k).copied().unwrap_or(0.0).max(1.0);
            (k, v / c * 1e6)
        })
        .collect()
}

struct Bench<'a> {
    setup: &'a Setup,
    packets: &'a [PacketBytes],
    exe: std::path::PathBuf,
    stats: Arc<SinkStats>,
    sent_times: Arc<SendTimes>,
    /// Extra node environment (LOAD_NODE_ENV=K=V,K=V), for experiments.
    node_env: Vec<(&'static str, String)>,
}

impl Bench<'_> {
    async fn step(&self, rate: f64) -> Step {
        let n = ((rate * STEP.as_secs_f64()) as usize).min(self.packets.len());
        let node = self
            .setup
            .spawn_node(&self.exe, &self.node_env)
            .expect("node under test starts");
        let links = loadgen::prepare_links(self.setup, self.packets, 0..n)
            .await
            .expect("links");
        self.stats.take_latencies();
        let before = self.stats.received.load(Ordering::Relaxed);
        let cpu0 = node.cpu_time();
        let split0 = node.cpu_split();
        let counter = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        loadgen::send(
            links,
            Pace::Rate(rate),
            self.sent_times.clone(),
            self.stats.clone(),
            counter.clone(),
        )
        .await;
        let window = t0.elapsed();
        let in_window = self.stats.received.load(Ordering::Relaxed) - before;
        // Stragglers: wait until nothing arrives for 300 ms (or everything did).
        let mut last = in_window;
        let mut quiet = Instant::now();
        while quiet.elapsed() < Duration::from_millis(300) && last < n as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.stats.received.load(Ordering::Relaxed) - before;
            if now != last {
                last = now;
                quiet = Instant::now();
            }
        }
        let forwarded = self.stats.received.load(Ordering::Relaxed) - before;
        let cpu = node.cpu_time() - cpu0;
        let split1 = node.cpu_split();
        let per = |d: Duration| d.as_secs_f64() * 1e6 / forwarded.max(1) as f64;
        let drops = loadgen::drops(self.setup.node_http, &self.setup.metrics_token);
        let scraped =
            loadgen::scrape(self.setup.node_http, &self.setup.metrics_token).unwrap_or_default();
        let mut stages = stage_means(&scraped);
        stages.push(("cpu_workers_us".into(), per(split1.0 - split0.0)));
        stages.push(("cpu_runtime_us".into(), per(split1.1 - split0.1)));
        for stage in ["forwarder_queue", "delay_overrun"] {
            if let Some(p99) = stage_p99(&scraped, stage) {
                stages.push((format!("{stage}_p99_le"), p99 * 1000.0));
            }
        }
        node.stop();
        let mut lat = self.stats.take_latencies();
        let sent = counter.load(Ordering::Relaxed);
        Step {
            offered: sent as f64 / window.as_secs_f64(),
            goodput: in_window as f64 / window.as_secs_f64(),
            loss: 1.0 - forwarded as f64 / sent.max(1) as f64,
            cpu_us: cpu.as_secs_f64() * 1e6 / forwarded.max(1) as f64,
            p50: loadgen::percentile(&mut lat, 0.5),
            p99: loadgen::percentile(&mut lat, 0.99),
            drops,
            stages,
        }
    }
}

fn print(s: &Step) {
    let stages: Vec<String> = s
        .stages
        .iter()
        .map(|(k, v)| format!("{k}={v:.0}µs"))
        .collect();
    println!(
        "| {:>8.0} | {:>9.0} | {:>7.3}% | {:>7.1} | {:>7.2} | {:>7.2} | {:?} {}",
        s.offered,
        s.goodput,
        s.loss * 100.0,
        s.cpu_us,
        s.p50.as_secs_f64() * 1e3,
        s.p99.as_secs_f64() * 1e3,
        s.drops,
        stages.join(" ")
    );
}

fn main() {
    let exe =
        loadgen::node_binary().expect("nym-node binary next to the bench (cargo bench builds it)");
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup::new(dir.path(), 4).unwrap();
    let max_rate = 48_000.0;
    let t = Instant::now();
    let packets = setup.build_packets((max_rate * STEP.as_secs_f64()) as usize, 2);
    println!(
        "built {} packets in {:.1}s",
        packets.len(),
        t.elapsed().as_secs_f64()
    );
    let (floor_before, expected) = setup.unwrap_floor(&packets);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = {
        let _runtime = rt.enter();
        setup.sink_listener().unwrap()
    };
    let (lossless, at_lossless, half, double) = rt.block_on(async {
        let stats = Arc::new(SinkStats::default());
        let sent_times = SendTimes::new(packets.len());
        tokio::spawn(loadgen::run_sink(
            listener,
            setup.sink.clone(),
            vec![setup.node.public().noise_key],
            Arc::new(expected),
            sent_times.clone(),
            stats.clone(),
        ));
        let node_env = std::env::var("LOAD_NODE_ENV")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (&*Box::leak(k.to_string().into_boxed_str()), v.to_string()))
            .collect();
        let bench = Bench {
            setup: &setup,
            packets: &packets,
            exe,
            stats,
            sent_times,
            node_env,
        };
        println!("| offered/s | forwarded/s | loss | cpu µs/pkt | p50 ms | p99 ms | node drops");
        println!("|---|---|---|---|---|---|---|");
        let mut lossless = 0.0f64;
        let mut lossy = max_rate;
        // LOAD_RATES=4000,9000 runs just those steps (for profiling), skipping the search.
        if let Ok(rates) = std::env::var("LOAD_RATES") {
            for r in rates
                .split(',')
                .filter_map(|r| r.trim().parse::<f64>().ok())
            {
                print(&bench.step(r).await);
            }
            std::process::exit(0);
        }
        for rate in [
            4_000.0, 8_000.0, 12_000.0, 16_000.0, 20_000.0, 24_000.0, 28_000.0, 32_000.0, 40_000.0,
        ] {
            let s = bench.step(rate).await;
            print(&s);
            if s.loss <= LOSSLESS {
                lossless = lossless.max(rate);
            } else {
                lossy = lossy.min(rate);
                if rate > lossless + 8_000.0 {
                    break;
                }
            }
        }
        // Narrow the lossless rate between the last lossless and the first lossy step.
        for _ in 0..3 {
            let mid = ((lossless + lossy) / 2.0 / 250.0).round() * 250.0;
            if mid <= lossless || mid >= lossy {
                break;
            }
            let s = bench.step(mid).await;
            print(&s);
            if s.loss <= LOSSLESS {
                lossless = mid;
            } else {
                lossy = mid;
            }
        }
        println!("-- at, half and twice the lossless rate ({lossless:.0}/s):");
        let at = bench.step(lossless).await;
        print(&at);
        let half = bench.step(lossless / 2.0).await;
        print(&half);
        let double = bench.step((lossless * 2.0).min(max_rate)).await;
        print(&double);
        (lossless, at, half, double)
    });
    // The floor again after the sweep, on the same packets; the mean of both is used.
    let (floor_after, _) = setup.unwrap_floor(&packets);
    let floor = (floor_before + floor_after) / 2;
    println!("floor_unwrap_us={:.1}", floor.as_secs_f64() * 1e6);
    println!("lossless_pps={lossless:.0}");
    println!("cpu_us_per_packet={:.1}", at_lossless.cpu_us);
    println!(
        "cpu_vs_floor={:.3}",
        at_lossless.cpu_us / (floor.as_secs_f64() * 1e6)
    );
    println!(
        "goodput_at_2x_ratio={:.3}",
        double.goodput / lossless.max(1.0)
    );
    println!(
        "latency_at_half_lossless p50_ms={:.2} p99_ms={:.2}",
        half.p50.as_secs_f64() * 1e3,
        half.p99.as_secs_f64() * 1e3
    );
    println!(
        "latency_at_lossless p50_ms={:.2} p99_ms={:.2}",
        at_lossless.p50.as_secs_f64() * 1e3,
        at_lossless.p99.as_secs_f64() * 1e3
    );
}

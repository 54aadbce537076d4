//! Places INSTANCES instances (services of 10 replicas each, mixed sizes, some
//! with constraints and `max_per_node`) on NODES fake nodes and prints the time
//! and placements per second as `placed=N failed=N seconds=S per_second=R`.
//! `scripts/bench-nodes` runs it.

#![expect(clippy::print_stdout, reason = "a benchmark prints its figures")]

use slipway_controller::schedule::{Demand, NodeInfo, NodeStatus, Resources, Scheduler};
use slipway_core::placement::{Constraint, PlacementStrategy};

fn arg(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let nodes = arg("NODES", 1000);
    let instances = arg("INSTANCES", 10_000);
    let zone = |i: usize| ["a", "b", "c"][i % 3].to_owned();
    let fleet: Vec<NodeInfo> = (0..nodes)
        .map(|i| NodeInfo {
            name: format!("node-{i:04}"),
            labels: [("zone".to_owned(), zone(i))].into_iter().collect(),
            capacity: Resources {
                millicpu: 16_000,
                memory: 64 << 30,
            },
            allocated: Resources::default(),
            status: if i % 50 == 49 {
                NodeStatus::Cordoned
            } else {
                NodeStatus::Ready
            },
        })
        .collect();
    let demands: Vec<Demand> = (0..instances.div_ceil(10))
        .map(|s| Demand {
            service: format!("svc-{s}"),
            resources: Resources {
                millicpu: [100, 250, 500, 1000][s % 4],
                memory: [64u64 << 20, 256 << 20, 512 << 20, 1 << 30][s % 4],
            },
            constraints: if s % 5 == 0 {
                vec![Constraint::parse(&format!("zone={}", zone(s))).expect("constraint")]
            } else {
                Vec::new()
            },
            max_per_node: (s % 7 == 0).then_some(1),
            strategy: if s % 2 == 0 {
                PlacementStrategy::Spread
            } else {
                PlacementStrategy::Binpack
            },
        })
        .collect();
    let started = std::time::Instant::now();
    let mut scheduler = Scheduler::new(fleet);
    let (mut placed, mut failed) = (0usize, 0usize);
    let mut left = instances;
    for d in &demands {
        let n = left.min(10);
        left -= n;
        for r in scheduler.place_many(d, n) {
            if r.is_ok() {
                placed += 1;
            } else {
                failed += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let rate = (placed + failed) as f64 / secs;
    println!("placed={placed} failed={failed} seconds={secs:.4} per_second={rate:.0}");
}

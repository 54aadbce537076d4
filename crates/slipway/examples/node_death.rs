//! How soon a dead node's instances serve elsewhere: three nodes and two control
//! planes in network namespaces (`slipway_testkit::cluster`), a service of 6
//! replicas, and `KILLS` times (default 10) the node running most of them is
//! SIGKILLed whole (agent and instances) under GETs through both ingresses. Each
//! kill prints the time until the service has 6 ready instances again, none on
//! that node, and the failed GETs; the dead node is then started again (its
//! stale instances are stopped) before the next kill. Run by `scripts/bench-nodes`
//! as root: `SLIPWAY_BIN=target/release/slipway cargo run --example node_death`.

#![expect(clippy::unwrap_used, clippy::print_stdout, reason = "a benchmark")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use slipway_testkit::cluster::{Cluster, INGRESS, Load};
use slipway_testkit::poll;

fn main() {
    let bin = std::env::var("SLIPWAY_BIN").unwrap_or_else(|_| "target/release/slipway".into());
    let kills: usize = std::env::var("KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(10);
    let mut c = Cluster::start(&bin);
    c.pack("hello:1", "1");
    let leader = c.leader();
    c.deploy(
        leader,
        &format!(
            "name = \"web\"\nimage = \"hello:1\"\nreplicas = 6\ndrain_timeout = \"2s\"\n[ingress]\nlisten = \"0.0.0.0:{INGRESS}\"\n[health.readiness]\nhttp = \"/healthz\"\ninterval = \"100ms\"\n"
        ),
        false,
    );
    poll(Duration::from_secs(60), || c.settled(leader, 6)).expect("6 ready");
    let ingresses = vec![
        SocketAddr::new(c.topo.addr("cp1"), INGRESS),
        SocketAddr::new(c.topo.addr("cp2"), INGRESS),
    ];
    let mut times = Vec::new();
    let (mut all_ok, mut all_failed) = (0u64, 0usize);
    for k in 0..kills {
        let nodes = poll(Duration::from_secs(60), || c.settled(leader, 6)).expect("settled");
        let node = ["n1", "n2", "n3"]
            .into_iter()
            .max_by_key(|n| nodes.iter().filter(|x| x == n).count())
            .unwrap();
        let on_it = nodes.iter().filter(|x| *x == node).count();
        let load = Load::start(&c.topo, ingresses.clone());
        let killed = Instant::now();
        c.topo.kill_all(node);
        c.replaced_without(leader, node, 6, Duration::from_secs(120))
            .expect("replaced");
        let took = killed.elapsed();
        let (ok, failed) = load.counts();
        println!(
            "kill {}: {node} with {on_it} instance(s): replacements ready after {:.2} s; {} of {} GETs failed",
            k + 1,
            took.as_secs_f64(),
            failed.len(),
            ok + failed.len() as u64
        );
        for f in failed.iter().take(3) {
            println!("  failed: {f}");
        }
        times.push(took);
        all_ok += ok;
        all_failed += failed.len();
        c.start_agent(node);
        assert!(
            c.runs_nothing(node, Duration::from_secs(60)),
            "the node is back and runs nothing stale"
        );
    }
    times.sort();
    let pick = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index"
        )]
        let i = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
        times[i].as_secs_f64()
    };
    println!(
        "node death: {} kills, replacements ready p50 {:.2} s, p99 {:.2} s (max); failed GETs {} of {}",
        times.len(),
        pick(0.5),
        pick(0.99),
        all_failed,
        all_ok + all_failed as u64
    );
    let (_, _, _) = c.cli(leader, &["service", "rm", "web"]);
    for n in ["n1", "n2", "n3"] {
        let _ = c.runs_nothing(n, Duration::from_secs(20));
    }
}

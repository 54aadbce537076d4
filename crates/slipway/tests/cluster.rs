//! Several machines, made of network namespaces on one bridge (see
//! `slipway_testkit::netns` and `slipway_testkit::cluster`): etcd, two control
//! planes (`slipway serve --state etcd://… --no-instances`), three nodes each
//! running `slipway agent`, and a load generator, each in a namespace of its own
//! with an address from a subnet that exists only inside them. Every scenario
//! runs under continuous GETs through the control planes' ingresses and counts
//! the failed ones.

#![expect(
    clippy::print_stderr,
    reason = "the measured times go to the test output"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use slipway_testkit::cluster::{Cluster, INGRESS, Load, get};
use slipway_testkit::poll;

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

fn spec(replicas: u32, extra: &str) -> String {
    format!(
        "name = \"web\"\nimage = \"hello:1\"\nreplicas = {replicas}\ndrain_timeout = \"2s\"\n[ingress]\nlisten = \"0.0.0.0:{INGRESS}\"\n[health.readiness]\nhttp = \"/healthz\"\ninterval = \"100ms\"\n{extra}"
    )
}

fn per_node(nodes: &[String]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for n in nodes {
        match out.iter_mut().find(|(m, _)| m == n) {
            Some((_, c)) => *c += 1,
            None => out.push((n.clone(), 1)),
        }
    }
    out.sort();
    out
}

#[test]
fn replicas_spread_over_three_nodes_and_a_dead_or_cut_off_node_is_replaced_within_ten_seconds_without_a_failed_get()
 {
    let mut c = Cluster::start(BIN);
    c.pack("hello:1", "1");
    let leader = c.leader();
    c.deploy(leader, &spec(6, ""), false);
    let nodes = poll(Duration::from_secs(30), || c.settled(leader, 6)).expect("6 ready");
    assert_eq!(
        per_node(&nodes),
        vec![("n1".into(), 2), ("n2".into(), 2), ("n3".into(), 2)],
        "spread 2-2-2"
    );
    let ingresses = vec![
        SocketAddr::new(c.topo.addr("cp1"), INGRESS),
        SocketAddr::new(c.topo.addr("cp2"), INGRESS),
    ];
    poll(Duration::from_secs(10), || {
        ingresses
            .iter()
            .all(|a| get(*a, "/").is_some_and(|(s, b)| s == 200 && b.starts_with("hello 1")))
            .then_some(())
    })
    .expect("both control planes serve the ingress");

    // Logs of instances on other machines come through their agents.
    let (code, out, err) = c.cli(leader, &["service", "logs", "web"]);
    assert_eq!(code, 0, "{err}");
    for n in ["n1", "n2", "n3"] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("@{n} | hello 1")) && l.contains("listening on")),
            "a line of an instance on {n} in:\n{out}"
        );
    }

    // A machine dies: its agent and its instances are SIGKILLed.
    let load = Load::start(&c.topo, ingresses.clone());
    let killed = Instant::now();
    c.topo.kill_all("n1");
    let nodes = c
        .replaced_without(leader, "n1", 6, Duration::from_secs(20))
        .expect("replaced elsewhere");
    let took = killed.elapsed();
    let gets = load.finish("kill -9 of n1");
    assert!(
        took < Duration::from_secs(10),
        "replacements ready {took:?} after the kill"
    );
    assert_eq!(per_node(&nodes), vec![("n2".into(), 3), ("n3".into(), 3)]);
    eprintln!("n1 killed: replacements ready after {took:?}; {gets} GETs, none failed");

    // It comes back: what it ran is stale and stopped.
    c.start_agent("n1");
    assert!(
        c.runs_nothing("n1", Duration::from_secs(30)),
        "n1's stale instances are stopped once it is back"
    );

    // A node is cut off (its link down): its instances are replaced; when the
    // link returns, what it still runs is stopped.
    let load = Load::start(&c.topo, ingresses.clone());
    let cut = Instant::now();
    c.topo.link("n2", false);
    c.replaced_without(leader, "n2", 6, Duration::from_secs(20))
        .expect("n2's instances replaced");
    let took = cut.elapsed();
    let gets = load.finish("n2's link down");
    assert!(
        took < Duration::from_secs(10),
        "replacements ready {took:?} after the cut"
    );
    eprintln!("n2 cut off: replacements ready after {took:?}; {gets} GETs, none failed");
    assert_eq!(c.on_agent("n2"), None, "n2 cannot be reached while cut off");
    c.topo.link("n2", true);
    assert!(
        c.runs_nothing("n2", Duration::from_secs(20)),
        "n2's stale instances are stopped once it is back"
    );

    let (code, _, err) = c.cli(leader, &["service", "rm", "web"]);
    assert_eq!(code, 0, "{err}");
    for n in ["n1", "n2", "n3"] {
        assert!(
            c.runs_nothing(n, Duration::from_secs(20)),
            "{n} runs nothing after rm"
        );
    }
}

#[test]
fn drain_etcd_restart_and_the_death_of_the_leader_mid_rollout_fail_no_request() {
    let mut c = Cluster::start(BIN);
    c.pack("hello:1", "1");
    c.pack("hello:2", "2");
    let leader = c.leader();
    c.deploy(leader, &spec(6, ""), false);
    poll(Duration::from_secs(30), || c.settled(leader, 6)).expect("6 ready");
    let ingresses = vec![
        SocketAddr::new(c.topo.addr("cp1"), INGRESS),
        SocketAddr::new(c.topo.addr("cp2"), INGRESS),
    ];
    poll(Duration::from_secs(10), || {
        ingresses
            .iter()
            .all(|a| get(*a, "/").is_some_and(|(s, _)| s == 200))
            .then_some(())
    })
    .expect("both control planes serve the ingress");

    // Drain: every instance of n3 moves, each replacement ready first.
    let load = Load::start(&c.topo, ingresses.clone());
    let (code, out, err) = c.cli(leader, &["node", "drain", "n3", "--timeout", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    let nodes = poll(Duration::from_secs(20), || c.settled(leader, 6)).expect("settled");
    load.finish("drain of n3");
    assert!(!nodes.iter().any(|n| n == "n3"), "{nodes:?}");
    assert!(
        c.runs_nothing("n3", Duration::from_secs(20)),
        "n3 runs nothing"
    );
    assert_eq!(c.cli(leader, &["node", "uncordon", "n3"]).0, 0);

    // etcd restarts: control planes and agents reconnect, nothing is lost.
    let load = Load::start(&c.topo, ingresses.clone());
    c.proc("etcd").kill();
    c.start_etcd();
    poll(Duration::from_secs(30), || {
        (c.ready_nodes(leader) == 3).then_some(())
    })
    .expect("the agents heartbeat again after etcd's restart");
    let (code, _, err) = c.cli(leader, &["scale", "web", "4"]);
    assert_eq!(code, 0, "scale after etcd's restart: {err}");
    poll(Duration::from_secs(30), || c.settled(leader, 4)).expect("scaled to 4");
    load.finish("etcd restart");

    // The leader dies mid-rollout; the other control plane finishes or rolls
    // it back, and its ingress serves throughout.
    let other = if leader == "cp1" { "cp2" } else { "cp1" };
    let load = Load::start(&c.topo, vec![SocketAddr::new(c.topo.addr(other), INGRESS)]);
    c.deploy(
        leader,
        &spec(4, "[env]\nHELLO_START_DELAY_MS = \"3000\"\n").replace("hello:1", "hello:2"),
        true,
    );
    poll(Duration::from_secs(15), || {
        let st = c.status(leader);
        st["instances"]
            .as_array()?
            .iter()
            .any(|i| i["revision"] == 2)
            .then_some(())
    })
    .expect("revision 2 started an instance");
    let killed = Instant::now();
    c.proc(leader).kill();
    poll(Duration::from_secs(30), || {
        let st = c.status(other);
        let done = st["revisions"][1]["status"] == "active"
            || st["revisions"][1]["status"] == "rolled-back";
        (done && st["phase"] == "idle").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{other} ended the rollout: {}\n{other}'s log:\n{}",
            c.status(other),
            c.tail(other)
        )
    });
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "{took:?}: lease TTL 5 s + 5 s"
    );
    load.finish("leader killed mid-rollout");
    // The agents heartbeat to the control plane left: no node went down.
    assert_eq!(c.ready_nodes(other), 3);
    eprintln!("leader killed mid-rollout: {other} ended it after {took:?}");

    let (code, _, err) = c.cli(other, &["service", "rm", "web"]);
    assert_eq!(code, 0, "{err}");
    for n in ["n1", "n2", "n3"] {
        assert!(
            c.runs_nothing(n, Duration::from_secs(20)),
            "{n} runs nothing after rm"
        );
    }
}

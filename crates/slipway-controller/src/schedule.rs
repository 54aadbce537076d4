//! Placing instances on nodes: requested cpu and memory against what each node
//! has left, node-label constraints, at most `max_per_node` replicas of a service
//! per node, and replicas spread over nodes (or packed onto the fullest).
//!
//! The scheduler is plain data and arithmetic, with no I/O: the control plane
//! builds it from the nodes it knows and the instances placed so far, asks it
//! where each new instance goes, and records the answers. An instance that fits
//! nowhere gets a reason naming, per cause, how many nodes refused it, as
//! Kubernetes' "0/3 nodes are available: 2 Insufficient cpu, 1 node(s) didn't
//! match node selector" does.
//!
//! Cost: one pass over the nodes per instance, with the service's per-node
//! replica counts in a vector indexed like the nodes (no hashing in the loop).

use std::collections::{BTreeMap, HashMap};

use slipway_core::placement::{Constraint, PlacementStrategy};

/// CPU in thousandths of a core, and memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    /// Thousandths of a core.
    pub millicpu: u64,
    /// Bytes.
    pub memory: u64,
}

impl Resources {
    /// What an instance asks for: its `cpus` and `memory` limits, or nothing.
    pub fn of(cpus: Option<f64>, memory: Option<&str>) -> Self {
        Self {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "validated: 0.01..=1024 cores"
            )]
            millicpu: cpus.map_or(0, |c| (c * 1000.0).round() as u64),
            memory: memory
                .and_then(slipway_core::placement::parse_size)
                .unwrap_or(0),
        }
    }

    fn fits_in(self, free: Self) -> bool {
        self.millicpu <= free.millicpu && self.memory <= free.memory
    }
}

/// Whether a node takes new instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeStatus {
    /// Heartbeating and schedulable.
    #[default]
    Ready,
    /// Up, but takes no new instances (`node cordon`, or being drained).
    Cordoned,
    /// Missed its heartbeats past the grace: its instances are replaced.
    Down,
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// What it has in all.
    pub capacity: Resources,
    /// What instances placed on it ask for.
    pub allocated: Resources,
    /// Whether it takes new instances.
    pub status: NodeStatus,
}

impl NodeInfo {
    fn free(&self) -> Resources {
        Resources {
            millicpu: self
                .capacity
                .millicpu
                .saturating_sub(self.allocated.millicpu),
            memory: self.capacity.memory.saturating_sub(self.allocated.memory),
        }
    }

    /// How full it is, in millionths, by the fuller of cpu and memory.
    fn fullness(&self, adding: Resources) -> u64 {
        let part =
            |used: u64, cap: u64| used.saturating_mul(1_000_000).checked_div(cap).unwrap_or(0);
        part(
            self.allocated.millicpu + adding.millicpu,
            self.capacity.millicpu,
        )
        .max(part(
            self.allocated.memory + adding.memory,
            self.capacity.memory,
        ))
    }
}

/// What one service's instances need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// The service.
    pub service: String,
    /// Per instance.
    pub resources: Resources,
    /// Node-label constraints.
    pub constraints: Vec<Constraint>,
    /// At most this many of the service's replicas per node.
    pub max_per_node: Option<u32>,
    /// Spread or binpack.
    pub strategy: PlacementStrategy,
}

/// Why an instance could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unplaceable(pub String);

/// The nodes and what is placed on them.
#[derive(Debug, Default)]
pub struct Scheduler {
    nodes: Vec<NodeInfo>,
    /// Per service, its replica count on each node (indexed like `nodes`).
    per_service: HashMap<String, Vec<u32>>,
}

impl Scheduler {
    /// A scheduler over `nodes`, with nothing placed beyond their `allocated`.
    pub fn new(nodes: Vec<NodeInfo>) -> Self {
        Self {
            nodes,
            per_service: HashMap::new(),
        }
    }

    /// The nodes, with what has been placed so far.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Records an instance of `service` already running on node `node` (by
    /// name): it counts against the node's capacity and the service's
    /// `max_per_node`. Unknown nodes are ignored.
    pub fn record(&mut self, service: &str, node: &str, resources: Resources) {
        let Some(i) = self.nodes.iter().position(|n| n.name == node) else {
            return;
        };
        self.add(service, i, resources);
    }

    fn add(&mut self, service: &str, i: usize, r: Resources) {
        self.allocate(i, r);
        let len = self.nodes.len();
        let counts = self
            .per_service
            .entry(service.to_owned())
            .or_insert_with(|| vec![0; len]);
        counts[i] += 1;
    }

    fn allocate(&mut self, i: usize, r: Resources) {
        let n = &mut self.nodes[i];
        n.allocated.millicpu += r.millicpu;
        n.allocated.memory += r.memory;
    }

    /// Places one instance of `demand`; the node's name, or why it fits nowhere.
    pub fn place(&mut self, demand: &Demand) -> Result<String, Unplaceable> {
        let mut placed = self.place_many(demand, 1);
        placed
            .pop()
            .unwrap_or_else(|| Err(Unplaceable("nothing asked".into())))
    }

    /// Places `count` instances of `demand`, one after another (each sees the
    /// ones before it).
    pub fn place_many(
        &mut self,
        demand: &Demand,
        count: usize,
    ) -> Vec<Result<String, Unplaceable>> {
        let len = self.nodes.len();
        // Which nodes the constraints allow never changes within one call.
        let allowed: Vec<bool> = self
            .nodes
            .iter()
            .map(|n| {
                demand
                    .constraints
                    .iter()
                    .all(|c| c.matches(n.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
            })
            .collect();
        // The service's replicas per node, taken out of the map for the whole
        // batch (no lookup per placement) and put back at the end.
        let mut counts = self
            .per_service
            .remove(&demand.service)
            .unwrap_or_else(|| vec![0; len]);
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let mut best: Option<(usize, (u32, u64))> = None;
            let mut refused = Refusals::default();
            for (i, node) in self.nodes.iter().enumerate() {
                if node.status != NodeStatus::Ready {
                    refused.not_ready += 1;
                    continue;
                }
                if !allowed[i] {
                    refused.labels += 1;
                    continue;
                }
                if demand.max_per_node.is_some_and(|m| counts[i] >= m) {
                    refused.max_per_node += 1;
                    continue;
                }
                let free = node.free();
                if !demand.resources.fits_in(free) {
                    if demand.resources.millicpu > free.millicpu {
                        refused.cpu += 1;
                    }
                    if demand.resources.memory > free.memory {
                        refused.memory += 1;
                    }
                    continue;
                }
                // Lower is better.
                let fullness = node.fullness(demand.resources);
                let key = match demand.strategy {
                    PlacementStrategy::Spread => (counts[i], fullness),
                    PlacementStrategy::Binpack => (0, 1_000_000u64.saturating_sub(fullness)),
                };
                if best.is_none_or(|(_, k)| key < k) {
                    best = Some((i, key));
                }
            }
            match best {
                Some((i, _)) => {
                    self.allocate(i, demand.resources);
                    counts[i] += 1;
                    out.push(Ok(self.nodes[i].name.clone()));
                }
                None => out.push(Err(Unplaceable(refused.reason(len, demand)))),
            }
        }
        self.per_service.insert(demand.service.clone(), counts);
        out
    }
}

/// How many nodes refused an instance, by cause.
#[derive(Default)]
struct Refusals {
    not_ready: usize,
    labels: usize,
    max_per_node: usize,
    cpu: usize,
    memory: usize,
}

impl Refusals {
    fn reason(&self, nodes: usize, demand: &Demand) -> String {
        if nodes == 0 {
            return "no nodes have joined".into();
        }
        let mut parts = Vec::new();
        if self.cpu > 0 {
            parts.push(format!(
                "{} without {} free cpu",
                self.cpu,
                cores(demand.resources.millicpu)
            ));
        }
        if self.memory > 0 {
            parts.push(format!(
                "{} without {} MiB free memory",
                self.memory,
                demand.resources.memory >> 20
            ));
        }
        if self.max_per_node > 0 {
            parts.push(format!(
                "{} already running max_per_node = {}",
                self.max_per_node,
                demand.max_per_node.unwrap_or(0)
            ));
        }
        if self.labels > 0 {
            let c: Vec<String> = demand.constraints.iter().map(ToString::to_string).collect();
            parts.push(format!("{} not matching {}", self.labels, c.join(", ")));
        }
        if self.not_ready > 0 {
            parts.push(format!("{} cordoned or down", self.not_ready));
        }
        format!("0/{nodes} nodes can take it: {}", parts.join("; "))
    }
}

fn cores(millicpu: u64) -> String {
    if millicpu.is_multiple_of(1000) {
        format!("{}", millicpu / 1000)
    } else {
        format!("{}.{:03}", millicpu / 1000, millicpu % 1000)
            .trim_end_matches('0')
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpus: u64, mem_gib: u64, labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            capacity: Resources {
                millicpu: cpus * 1000,
                memory: mem_gib << 30,
            },
            allocated: Resources::default(),
            status: NodeStatus::Ready,
        }
    }

    fn demand(service: &str, cpus: f64, memory: &str) -> Demand {
        Demand {
            service: service.into(),
            resources: Resources::of(Some(cpus), Some(memory)),
            constraints: Vec::new(),
            max_per_node: None,
            strategy: PlacementStrategy::Spread,
        }
    }

    fn names(r: Vec<Result<String, Unplaceable>>) -> Vec<String> {
        r.into_iter().map(|p| p.expect("placed")).collect()
    }

    #[test]
    fn replicas_spread_evenly_over_nodes_by_default() {
        let mut s = Scheduler::new(vec![
            node("a", 4, 8, &[]),
            node("b", 4, 8, &[]),
            node("c", 4, 8, &[]),
        ]);
        let mut placed = names(s.place_many(&demand("web", 0.5, "256m"), 6));
        placed.sort();
        assert_eq!(placed, ["a", "a", "b", "b", "c", "c"]);
    }

    #[test]
    fn binpack_fills_the_fullest_node_that_fits_first() {
        let mut s = Scheduler::new(vec![node("a", 2, 8, &[]), node("b", 2, 8, &[])]);
        s.record(
            "other",
            "b",
            Resources {
                millicpu: 500,
                memory: 0,
            },
        );
        let mut d = demand("web", 0.5, "64m");
        d.strategy = PlacementStrategy::Binpack;
        assert_eq!(names(s.place_many(&d, 4)), ["b", "b", "b", "a"]);
    }

    #[test]
    fn constraints_and_max_per_node_limit_where_replicas_go() {
        let mut s = Scheduler::new(vec![
            node("a", 8, 8, &[("zone", "x")]),
            node("b", 8, 8, &[("zone", "y")]),
            node("c", 8, 8, &[("zone", "x")]),
        ]);
        let mut d = demand("web", 0.1, "64m");
        d.constraints = vec![Constraint::parse("zone=x").expect("constraint")];
        d.max_per_node = Some(2);
        let placed = s.place_many(&d, 5);
        let ok: Vec<_> = placed.iter().filter_map(|p| p.as_ref().ok()).collect();
        assert_eq!(ok.len(), 4);
        assert!(ok.iter().all(|n| *n == "a" || *n == "c"));
        let err = placed[4].as_ref().expect_err("the fifth fits nowhere");
        assert_eq!(
            err.0,
            "0/3 nodes can take it: 2 already running max_per_node = 2; 1 not matching zone=x"
        );
    }

    #[test]
    fn an_instance_that_fits_nowhere_says_which_resource_is_short() {
        let mut s = Scheduler::new(vec![node("a", 1, 1, &[]), node("b", 2, 1, &[])]);
        s.nodes[1].status = NodeStatus::Cordoned;
        let err = s.place(&demand("db", 1.5, "2g")).expect_err("too big");
        assert_eq!(
            err.0,
            "0/2 nodes can take it: 1 without 1.5 free cpu; 1 without 2048 MiB free memory; 1 cordoned or down"
        );
        assert_eq!(
            Scheduler::default()
                .place(&demand("db", 1.0, "1g"))
                .expect_err("none")
                .0,
            "no nodes have joined"
        );
    }

    #[test]
    fn capacity_is_used_up_and_never_exceeded() {
        let mut s = Scheduler::new(vec![node("a", 2, 1, &[]), node("b", 2, 1, &[])]);
        let placed = s.place_many(&demand("web", 0.5, "256m"), 10);
        assert_eq!(placed.iter().filter(|p| p.is_ok()).count(), 8);
        for n in s.nodes() {
            assert!(n.allocated.millicpu <= n.capacity.millicpu);
            assert!(n.allocated.memory <= n.capacity.memory);
        }
    }
}

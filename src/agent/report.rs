//! What each node's agent tells the cluster: one `coordination.k8s.io/v1` Lease per node,
//! `kube-nsg-agent-<node>` in the agent's namespace, renewed as a heartbeat, with
//!
//! - `kubensg.io/programmed`: a JSON object `"namespace/nsg"` → the generation of that group
//!   the node's table enforces (for an NSG whose current spec is invalid, the last valid
//!   generation, which is what stays in force);
//! - `kubensg.io/rule-hits`: a JSON object `"namespace/nsg/Inbound|Outbound/rule"` → new flows
//!   the rule decided on this node since the agent started (rules that never matched are left
//!   out). Written at most every `--rule-hits-interval` and only when a count changed, so
//!   counters cost few API writes.
//!
//! The controller counts, per NSG, the live agents (a Lease renewed within its
//! `leaseDurationSeconds`, three heartbeats) that programmed its current generation
//! (`DataplaneProgrammed`, "N of M nodes"); `kube-nsg effective` reads the hits with
//! [`rule_hits`]. The Lease is owned by the Node object, so it goes with the node.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::dataplane::HitKey;
use crate::json_len;
use crate::model::{Direction, ObjectRef};

/// Every agent Lease is named this plus the node name.
pub const LEASE_PREFIX: &str = "kube-nsg-agent-";
/// Label on every agent Lease: the node it reports for (lists select agent Leases by it).
pub const NODE_LABEL: &str = "kubensg.io/agent-node";
pub const PROGRAMMED_ANNOTATION: &str = "kubensg.io/programmed";
pub const RULE_HITS_ANNOTATION: &str = "kubensg.io/rule-hits";
/// The field manager of the agent's writes.
pub const MANAGER: &str = "kube-nsg-agent";
/// The most the hits annotation takes (the busiest rules' counts, as many as fit): with the
/// programmed groups the Lease stays well under the API server's 256 KiB for all of an
/// object's annotations. Over it the API server refuses the write, heartbeat included.
pub const MAX_HITS_BYTES: usize = 128 * 1024;

pub fn lease_name(node: &str) -> String {
    format!("{LEASE_PREFIX}{node}")
}

/// `namespace/nsg/direction/rule`, the key of the rule-hits annotation.
pub fn hit_key_string((nsg, direction, rule): &HitKey) -> String {
    format!("{nsg}/{direction:?}/{rule}")
}

pub fn parse_hit_key(s: &str) -> Option<HitKey> {
    let mut parts = s.splitn(4, '/');
    let (ns, name, dir, rule) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let direction = match dir {
        "Inbound" => Direction::Inbound,
        "Outbound" => Direction::Outbound,
        _ => return None,
    };
    if ns.is_empty() || name.is_empty() || rule.is_empty() {
        return None;
    }
    Some((ObjectRef::new(ns, name), direction, rule.to_string()))
}

/// The hits annotation's value: nonzero counts only, the largest first as long as the text
/// stays within [`MAX_HITS_BYTES`], sorted by key.
pub fn hits_annotation(hits: &BTreeMap<HitKey, u64>) -> String {
    let mut nonzero: Vec<(String, u64)> = hits
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (hit_key_string(k), *n))
        .collect();
    nonzero.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut size = "{}".len();
    let map: BTreeMap<String, u64> = nonzero
        .into_iter()
        .take_while(|(k, n)| {
            // `"key":count,`
            size += json_len(k) + 1 + json_len(n) + 1;
            size <= MAX_HITS_BYTES
        })
        .collect();
    serde_json::to_string(&map).expect("a map of strings to numbers serializes")
}

pub fn programmed_annotation(programmed: &BTreeMap<ObjectRef, i64>) -> String {
    let map: BTreeMap<String, i64> = programmed
        .iter()
        .map(|(k, g)| (k.to_string(), *g))
        .collect();
    serde_json::to_string(&map).expect("a map of strings to numbers serializes")
}

/// What the agent of one node reports.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReport {
    pub node: String,
    /// The NSG generations its table enforces.
    pub programmed: BTreeMap<ObjectRef, i64>,
    pub hits: BTreeMap<HitKey, u64>,
    pub renewed: Option<Timestamp>,
    pub lease_duration: Duration,
}

impl NodeReport {
    /// A Lease of an agent, or `None` for any other Lease. Unreadable annotations read as
    /// empty.
    pub fn from_lease(lease: &Lease) -> Option<NodeReport> {
        let node = lease.labels().get(NODE_LABEL)?.clone();
        let annotation = |name: &str| lease.annotations().get(name).map(String::as_str);
        let programmed = annotation(PROGRAMMED_ANNOTATION)
            .and_then(|s| serde_json::from_str::<BTreeMap<String, i64>>(s).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, g)| Some((k.parse::<ObjectRef>().ok()?, g)))
            .collect();
        let hits = annotation(RULE_HITS_ANNOTATION)
            .and_then(|s| serde_json::from_str::<BTreeMap<String, u64>>(s).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, n)| Some((parse_hit_key(&k)?, n)))
            .collect();
        let spec = lease.spec.as_ref();
        Some(NodeReport {
            node,
            programmed,
            hits,
            renewed: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            lease_duration: Duration::from_secs(
                spec.and_then(|s| s.lease_duration_seconds)
                    .unwrap_or(0)
                    .max(0) as u64,
            ),
        })
    }

    /// Renewed within its lease duration (three heartbeats) before `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        let Some(renewed) = self.renewed else {
            return false;
        };
        let age = now.as_millisecond() - renewed.as_millisecond();
        age <= self.lease_duration.as_millis() as i64
    }
}

/// The server-side apply body of a node's Lease.
pub fn lease_body(
    node: &str,
    node_uid: Option<&str>,
    lease_duration: Duration,
    programmed: &BTreeMap<ObjectRef, i64>,
    hits: &str,
    now: Timestamp,
) -> serde_json::Value {
    let mut metadata = json!({
        "name": lease_name(node),
        "labels": {
            NODE_LABEL: node,
            "app.kubernetes.io/name": "kube-nsg",
            "app.kubernetes.io/component": "agent",
        },
        "annotations": {
            PROGRAMMED_ANNOTATION: programmed_annotation(programmed),
            RULE_HITS_ANNOTATION: hits,
        },
    });
    if let Some(uid) = node_uid {
        metadata["ownerReferences"] = json!([{
            "apiVersion": "v1",
            "kind": "Node",
            "name": node,
            "uid": uid,
        }]);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": lease_duration.as_secs().max(1),
            "renewTime": MicroTime(now),
        },
    })
}

/// Writes (creates or renews) the Lease.
pub async fn write_lease(
    api: &Api<Lease>,
    node: &str,
    body: &serde_json::Value,
) -> Result<(), kube::Error> {
    api.patch(
        &lease_name(node),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map(|_| ())
}

/// Deletes a node's Lease; no error when it is not there.
pub async fn delete_lease(api: &Api<Lease>, node: &str) -> Result<(), kube::Error> {
    match api.delete(&lease_name(node), &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every agent's report: from the Leases of `namespace`, or of all namespaces.
pub async fn node_reports(
    client: &Client,
    namespace: Option<&str>,
) -> Result<Vec<NodeReport>, kube::Error> {
    let api: Api<Lease> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let leases = api.list(&ListParams::default().labels(NODE_LABEL)).await?;
    let mut reports: Vec<NodeReport> = leases
        .items
        .iter()
        .filter_map(NodeReport::from_lease)
        .collect();
    reports.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(reports)
}

/// The hit counts of every NSG rule, summed over every node's agent (live or not: a node
/// that went away still counted its flows), from the agents' Leases in any namespace. For
/// the HITS column of `kube-nsg effective`.
pub async fn rule_hits(client: &Client) -> Result<BTreeMap<HitKey, u64>, kube::Error> {
    Ok(sum_hits(&node_reports(client, None).await?))
}

pub fn sum_hits(reports: &[NodeReport]) -> BTreeMap<HitKey, u64> {
    let mut out: BTreeMap<HitKey, u64> = BTreeMap::new();
    for r in reports {
        for (k, n) in &r.hits {
            *out.entry(k.clone()).or_default() += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rule: &str, d: Direction) -> HitKey {
        (ObjectRef::new("shop", "nsg1"), d, rule.into())
    }

    #[test]
    fn a_lease_round_trips() {
        let programmed = BTreeMap::from([
            (ObjectRef::new("shop", "nsg1"), 3),
            (ObjectRef::new("b", "x"), 1),
        ]);
        let hits = BTreeMap::from([
            (key("Deny-Database-All", Direction::Inbound), 7),
            (key("AllowVnetOutBound", Direction::Outbound), 0),
            (key("a/b", Direction::Outbound), 2),
        ]);
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let body = lease_body(
            "node-1",
            Some("uid-1"),
            Duration::from_secs(30),
            &programmed,
            &hits_annotation(&hits),
            now,
        );
        let lease: Lease = serde_json::from_value(body).unwrap();
        assert_eq!(lease.name_any(), "kube-nsg-agent-node-1");
        assert_eq!(
            lease.annotations()[RULE_HITS_ANNOTATION],
            r#"{"shop/nsg1/Inbound/Deny-Database-All":7,"shop/nsg1/Outbound/a/b":2}"#,
            "zero counts are left out; a rule name may hold a slash"
        );
        let report = NodeReport::from_lease(&lease).unwrap();
        assert_eq!(report.node, "node-1");
        assert_eq!(report.programmed, programmed);
        assert_eq!(report.hits.len(), 2);
        assert_eq!(report.hits[&key("a/b", Direction::Outbound)], 2);
        assert!(report.is_live(now));
        assert!(report.is_live(Timestamp::from_second(1_700_000_030).unwrap()));
        assert!(!report.is_live(Timestamp::from_second(1_700_000_031).unwrap()));
        assert_eq!(
            sum_hits(&[report.clone(), report])[&key("a/b", Direction::Outbound)],
            4
        );
    }

    #[test]
    fn the_hits_annotation_is_bounded_in_bytes() {
        // 2,000 rules with the longest names a group allows: 850 KB unbounded.
        let nsg = ObjectRef::new("n".repeat(63), "g".repeat(253));
        let hits: BTreeMap<HitKey, u64> = (0..2000u64)
            .map(|i| {
                let rule = format!("{i:0>80}");
                ((nsg.clone(), Direction::Inbound, rule), i + 1)
            })
            .collect();
        let text = hits_annotation(&hits);
        assert!(text.len() <= MAX_HITS_BYTES, "{} bytes", text.len());
        let parsed: BTreeMap<String, u64> = serde_json::from_str(&text).unwrap();
        assert!(parsed.len() > 250, "{} entries", parsed.len());
        let smallest_kept = parsed.values().min().unwrap();
        assert_eq!(
            *smallest_kept as usize,
            2000 - parsed.len() + 1,
            "the busiest stay"
        );
        // Short names: everything fits.
        let hits: BTreeMap<HitKey, u64> = (0..2000u64)
            .map(|i| (key(&format!("r{i}"), Direction::Inbound), i + 1))
            .collect();
        let parsed: BTreeMap<String, u64> = serde_json::from_str(&hits_annotation(&hits)).unwrap();
        assert_eq!(parsed.len(), 2000);
    }

    #[test]
    fn other_leases_and_bad_keys_are_ignored() {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "kube-nsg-controller"},
        }))
        .unwrap();
        assert!(NodeReport::from_lease(&lease).is_none());
        assert_eq!(parse_hit_key("a/b/Sideways/r"), None);
        assert_eq!(parse_hit_key("a/b/Inbound"), None);
    }
}

//! Controller benchmark against the local control plane (tests/cluster):
//! 2,000 pods in 50 namespaces, 50 ASGs, 100 NSGs of 50 rules.
//!
//! Prints four figures, with the targets:
//! 1. time from applying all NSGs to every NSG Ready (target: 30 s);
//! 2. time from relabelling one pod to its membership label, and to the ASG status update
//!    (target: 1 s);
//! 3. controller memory per pod, RSS / pods (target: under 5 KiB);
//! 4. API writes during no-op resyncs (target: 0).
//!
//! Run: `cargo bench --bench controller` (or `tests/bench/controller.sh`). Under `cargo test`
//! it does nothing. Environment: `BENCH_PODS` (2000), `BENCH_NAMESPACES` (50),
//! `BENCH_RULES` (50), `BENCH_KEEP=1` to leave the objects in place.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use kube_nsg::api::{ApplicationSecurityGroup, NetworkSecurityGroup};

const CONCURRENCY: usize = 32;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Sizes {
    namespaces: usize,
    pods_per_ns: usize,
    rules: usize,
}

fn ns_name(i: usize) -> String {
    format!("bench-{i:02}")
}

fn rule(r: usize) -> Value {
    let inbound = r.is_multiple_of(2);
    let access = if r % 5 == 4 { "Deny" } else { "Allow" };
    let protocol = ["Tcp", "Udp", "Tcp", "*"][r % 4];
    let ports = ["80", "443", "8000-8100", "5432", "9090-9099"][r % 5];
    let asg = json!([{"name": "web"}]);
    let mut v = json!({
        "name": format!("rule-{r:03}"),
        "priority": 100 + r * 10,
        "direction": if inbound { "Inbound" } else { "Outbound" },
        "access": access,
        "protocol": protocol,
        "destinationPortRange": ports,
    });
    let (src, dst): (Value, Value) = match r % 5 {
        0 => (json!("Internet"), asg.clone()),
        1 => (
            json!(["198.51.100.0/24", format!("203.0.113.{}/32", r % 250)]),
            json!("*"),
        ),
        2 => (json!("VirtualNetwork"), json!("VirtualNetwork")),
        3 => (json!("*"), asg.clone()),
        _ => (json!("10.96.0.0/16"), json!("*")),
    };
    // Outbound rules see the pod as the source.
    let (src, dst) = if inbound { (src, dst) } else { (dst, src) };
    let side = |v: &mut Value, side: &str, e: Value| {
        let key = match &e {
            Value::Array(a) if a.first().is_some_and(Value::is_object) => {
                format!("{side}ApplicationSecurityGroups")
            }
            Value::Array(_) => format!("{side}AddressPrefixes"),
            _ => format!("{side}AddressPrefix"),
        };
        v[key] = e;
    };
    side(&mut v, "source", src);
    side(&mut v, "destination", dst);
    v
}

fn nsg_object(ns: &str, name: &str, subnet: bool, rules: usize) -> NetworkSecurityGroup {
    let mut spec = json!({"securityRules": (0..rules).map(rule).collect::<Vec<_>>()});
    if subnet {
        spec["subnet"] = json!(true);
    } else {
        spec["podSelector"] = json!({"matchLabels": {"tier": "api"}});
    }
    serde_json::from_value(json!({
        "apiVersion": "kubensg.io/v1alpha1",
        "kind": "NetworkSecurityGroup",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("a valid NSG")
}

async fn client() -> Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(support::kubeconfig()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

async fn for_each<I, F, Fut>(items: I, f: F)
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures::stream::iter(items.into_iter().map(f))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
}

async fn cleanup(client: &Client, sizes: &Sizes) {
    for_each(0..sizes.namespaces, |i| {
        let client = client.clone();
        async move {
            let ns = ns_name(i);
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let force = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            let _ = pods.delete_collection(&force, &ListParams::default()).await;
            let _ = Api::<Namespace>::all(client)
                .delete(&ns, &DeleteParams::default())
                .await;
        }
    })
    .await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(300) {
        let left = namespaces.list(&ListParams::default()).await.map(|l| {
            l.items
                .iter()
                .filter(|n| {
                    n.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("bench-"))
                })
                .count()
        });
        if left.is_ok_and(|n| n == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("bench namespaces still terminating");
}

async fn create_inventory(client: &Client, sizes: &Sizes) {
    let pp = PostParams::default();
    for_each(0..sizes.namespaces, |i| {
        let client = client.clone();
        let pp = pp.clone();
        async move {
            let ns: Namespace = serde_json::from_value(json!({"metadata": {
                "name": ns_name(i),
                "labels": {support::SCOPE_LABEL: support::scope_value()},
            }}))
            .unwrap();
            Api::<Namespace>::all(client.clone())
                .create(&pp, &ns)
                .await
                .expect("namespace");
            let asg: ApplicationSecurityGroup = serde_json::from_value(json!({
                "apiVersion": "kubensg.io/v1alpha1", "kind": "ApplicationSecurityGroup",
                "metadata": {"name": "web", "namespace": ns_name(i)},
                "spec": {"podSelector": {"matchLabels": {"role": "web"}}},
            }))
            .unwrap();
            Api::<ApplicationSecurityGroup>::namespaced(client, &ns_name(i))
                .create(&pp, &asg)
                .await
                .expect("asg");
        }
    })
    .await;
    let pods: Vec<(usize, usize)> = (0..sizes.namespaces)
        .flat_map(|n| (0..sizes.pods_per_ns).map(move |p| (n, p)))
        .collect();
    for_each(pods, |(n, p)| {
        let client = client.clone();
        let pp = pp.clone();
        async move {
            let ns = ns_name(n);
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let name = format!("pod-{p:03}");
            let role = if p % 2 == 0 { "web" } else { "app" };
            let tier = if p % 4 == 0 { "api" } else { "backend" };
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"role": role, "tier": tier}},
                "spec": {"nodeName": support::NODE, "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
            }))
            .unwrap();
            api.create(&pp, &pod).await.expect("pod");
            let ip = format!("10.244.{}.{}", 100 + n, 10 + p);
            let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.expect("pod status");
        }
    })
    .await;
}

/// Lists every NSG: (total, ready at their current generation).
async fn ready_count(client: &Client) -> (usize, usize) {
    let api: Api<NetworkSecurityGroup> = Api::all(client.clone());
    let Ok(list) = api.list(&ListParams::default()).await else {
        return (0, 0);
    };
    let bench: Vec<_> = list
        .items
        .iter()
        .filter(|n| {
            n.metadata
                .namespace
                .as_deref()
                .is_some_and(|n| n.starts_with("bench-"))
        })
        .collect();
    let ready = bench
        .iter()
        .filter(|n| {
            let s = n.status.as_ref();
            s.and_then(|s| s.observed_generation) == n.metadata.generation
                && s.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
        })
        .count();
    (bench.len(), ready)
}

/// Memory of a process in KiB, from /proc/PID/status.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    peak: u64,
    anon: u64,
    file: u64,
}

fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("controller benchmark: run it with `cargo bench --bench controller`");
        return;
    }
    let sizes = Sizes {
        namespaces: env_usize("BENCH_NAMESPACES", 50),
        pods_per_ns: env_usize("BENCH_PODS", 2000) / env_usize("BENCH_NAMESPACES", 50),
        rules: env_usize("BENCH_RULES", 50),
    };
    let pods_total = sizes.namespaces * sizes.pods_per_ns;
    support::cluster();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(client());

    println!(
        "setup: {} namespaces, {pods_total} pods, {} ASGs, {} NSGs of {} rules",
        sizes.namespaces,
        sizes.namespaces,
        2 * sizes.namespaces,
        sizes.rules
    );
    rt.block_on(cleanup(&client, &sizes));
    let resync = Duration::from_secs(5);
    let ctl = support::Controller::start(
        "bench",
        &["--resync-interval", "5s", "--no-leader-election"],
    );
    let pid = ctl.pid();
    std::thread::sleep(Duration::from_secs(2));
    let empty = memory(pid);

    let t = Instant::now();
    rt.block_on(create_inventory(&client, &sizes));
    println!(
        "created {pods_total} pods and {} ASGs in {:.1?}",
        sizes.namespaces,
        t.elapsed()
    );
    // Let the controller label every pod and write the ASG statuses first.
    support::eventually("the controller to settle", Duration::from_secs(300), || {
        let w = ctl.writes();
        std::thread::sleep(Duration::from_secs(2));
        (w > 0.0 && ctl.writes() == w).then_some(())
    });

    // 1. All NSGs applied at once → every NSG Ready.
    let t0 = Instant::now();
    rt.block_on(for_each(0..sizes.namespaces, |i| {
        let client = client.clone();
        let rules = sizes.rules;
        async move {
            let api: Api<NetworkSecurityGroup> = Api::namespaced(client, &ns_name(i));
            for (name, subnet) in [("subnet", true), ("nic", false)] {
                api.create(
                    &PostParams::default(),
                    &nsg_object(&ns_name(i), name, subnet, rules),
                )
                .await
                .expect("nsg");
            }
        }
    }));
    let applied = t0.elapsed();
    let total = 2 * sizes.namespaces;
    loop {
        let (n, ready) = rt.block_on(ready_count(&client));
        if n == total && ready == total {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            panic!("only {ready}/{total} NSGs Ready after 600 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let all_ready = t0.elapsed();
    println!("applied {total} NSGs in {applied:.1?}; all Ready after {all_ready:.2?}");
    let writes_by_resource = |text: &str| -> String {
        text.lines()
            .filter(|l| l.starts_with("kube_nsg_api_writes_total{"))
            .map(|l| {
                l.trim_start_matches("kube_nsg_api_writes_total")
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n  ")
    };
    println!("writes so far:\n  {}", writes_by_resource(&ctl.metrics()));

    support::eventually("the controller to settle", Duration::from_secs(300), || {
        let w = ctl.writes();
        std::thread::sleep(Duration::from_secs(2));
        (ctl.writes() == w).then_some(())
    });

    // 2. Relabel one pod, back and forth: its membership label, then the ASG status.
    let mut label_times = Vec::new();
    let mut status_times = Vec::new();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name(0));
    let asgs: Api<ApplicationSecurityGroup> = Api::namespaced(client.clone(), &ns_name(0));
    let members_before = rt
        .block_on(asgs.get("web"))
        .unwrap()
        .status
        .map_or(0, |s| s.member_count);
    for round in 0..6 {
        let joining = round % 2 == 1;
        let role = if joining { "web" } else { "app" };
        let want_count = if joining {
            members_before
        } else {
            members_before - 1
        };
        let t = Instant::now();
        rt.block_on(pods.patch(
            "pod-000",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"role": role}}})),
        ))
        .unwrap();
        let mut labelled = None;
        loop {
            if labelled.is_none() {
                let pod = rt.block_on(pods.get("pod-000")).unwrap();
                let has = pod
                    .metadata
                    .labels
                    .unwrap_or_default()
                    .contains_key("asg.kubensg.io/web");
                if has == joining {
                    labelled = Some(t.elapsed());
                }
            }
            if labelled.is_some() {
                let asg = rt.block_on(asgs.get("web")).unwrap();
                if asg.status.map_or(-1, |s| s.member_count) == want_count {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "relabel not reflected within 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        label_times.push(labelled.unwrap());
        status_times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }

    // 3. Memory, after everything above.
    let mem = memory(pid);

    // 4. No-op resyncs.
    let writes = ctl.writes();
    let passes = ctl.metric("kube_nsg_reconciles_total");
    std::thread::sleep(resync * 3 + Duration::from_secs(1));
    let noop_writes = ctl.writes() - writes;
    let noop_passes = ctl.metric("kube_nsg_reconciles_total") - passes;
    let durations = ctl.metric("kube_nsg_reconcile_duration_seconds_sum")
        / ctl
            .metric("kube_nsg_reconcile_duration_seconds_count")
            .max(1.0);

    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    let per_pod = mem.rss as f64 / pods_total as f64;
    let kib = |v: u64| v as f64 / pods_total as f64;
    println!();
    println!(
        "=== kube-nsg controller benchmark ({pods_total} pods, {} namespaces, {} ASGs, {total} NSGs x {} rules)",
        sizes.namespaces, sizes.namespaces, sizes.rules
    );
    println!(
        "all NSGs Ready after apply:       {:>8.2} s   (target 30 s)   {}",
        all_ready.as_secs_f64(),
        verdict(all_ready <= Duration::from_secs(30))
    );
    println!(
        "relabel -> membership label:      {:>8.0} ms median, {:.0} ms max   (target 1 s)   {}",
        median(label_times.clone()).as_secs_f64() * 1000.0,
        label_times.iter().max().unwrap().as_secs_f64() * 1000.0,
        verdict(*label_times.iter().max().unwrap() <= Duration::from_secs(1))
    );
    println!(
        "relabel -> ASG status updated:    {:>8.0} ms median, {:.0} ms max   (target 1 s)   {}",
        median(status_times.clone()).as_secs_f64() * 1000.0,
        status_times.iter().max().unwrap().as_secs_f64() * 1000.0,
        verdict(*status_times.iter().max().unwrap() <= Duration::from_secs(1))
    );
    println!(
        "controller memory per pod:        {:>8.2} KiB   (RSS {} KiB / {pods_total} pods)   (target 5 KiB)   {}",
        per_pod,
        mem.rss,
        verdict(per_pod < 5.0)
    );
    println!(
        "  of which heap (anonymous):      {:>8.2} KiB   (RssAnon {} KiB; mapped program text RssFile {} KiB)",
        kib(mem.anon),
        mem.anon,
        mem.file
    );
    println!(
        "  growth over an empty cluster:   {:>8.2} KiB   (RSS {} -> {} KiB; peak {} KiB)",
        (mem.rss as f64 - empty.rss as f64) / pods_total as f64,
        empty.rss,
        mem.rss,
        mem.peak
    );
    println!(
        "writes during no-op resyncs:      {:>8} over {noop_passes} passes   (target 0)   {}",
        noop_writes,
        verdict(noop_writes == 0.0)
    );
    println!(
        "mean reconcile pass:              {:>8.1} ms",
        durations * 1000.0
    );

    drop(ctl);
    if std::env::var("BENCH_KEEP").is_err() {
        rt.block_on(cleanup(&client, &sizes));
    }
}

//! What the lab has changed on this machine, written before each change (so `down` can undo a
//! partial `up`), the lab-wide lock, and the source-port allocator shared by every prober.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::LabError;

/// Root of the lab's bookkeeping; on tmpfs, so it goes with a reboot like the namespaces do.
pub const STATE_DIR: &str = "/run/kube-nsg-lab";

/// Source ports of probes: below Linux's ephemeral range (32768-60999), so a probe's port
/// never collides with a port the kernel picked for something else.
pub const PROBE_PORTS: std::ops::Range<u16> = 20000..32768;

fn path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// The Node object registered for this machine.
    pub node_name: Option<String>,
    /// Network namespace → its host-side veth.
    pub endpoints: BTreeMap<String, String>,
    /// `namespace/name` of the Pod objects created.
    pub pods: BTreeSet<String>,
    /// Blackhole routes the lab added (others found in place are left alone).
    pub blackholes: BTreeSet<String>,
    /// Whether the dummy interface holding the node IP was created.
    pub dummy: bool,
}

impl State {
    pub fn load() -> Result<State, LabError> {
        match fs::read_to_string(path("state.json")) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                LabError::Other(format!(
                    "{}: {e}; delete it after cleaning up by hand (see tests/lab/README.md)",
                    path("state.json").display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io_err("reading the lab state")(e)),
        }
    }

    /// Written atomically (rename), so a crash leaves the previous or the new state.
    pub fn save(&self) -> Result<(), LabError> {
        fs::create_dir_all(STATE_DIR).map_err(io_err(STATE_DIR))?;
        let tmp = path("state.json.tmp");
        let text = serde_json::to_string_pretty(self).expect("state serializes");
        fs::write(&tmp, text).map_err(io_err("writing the lab state"))?;
        fs::rename(&tmp, path("state.json")).map_err(io_err("writing the lab state"))
    }

    pub fn is_empty(&self) -> bool {
        self.node_name.is_none()
            && self.endpoints.is_empty()
            && self.pods.is_empty()
            && self.blackholes.is_empty()
            && !self.dummy
    }

    pub fn remove_file() -> Result<(), LabError> {
        match fs::remove_file(path("state.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err("removing the lab state")(e))
            }
            _ => Ok(()),
        }
    }
}

/// One lab per machine: pod IPs and namespace names are machine-wide. Held by a library `Lab`
/// for its whole life and by the CLI's `up` and `down` while they run; a second holder waits.
pub struct LabLock(File);

impl LabLock {
    pub fn acquire() -> Result<LabLock, LabError> {
        fs::create_dir_all(STATE_DIR).map_err(io_err(STATE_DIR))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path("lock"))
            .map_err(io_err("opening the lab lock"))?;
        if file.try_lock().is_err() {
            eprintln!("lab: another lab holds {}; waiting", path("lock").display());
            file.lock().map_err(io_err("taking the lab lock"))?;
        }
        Ok(LabLock(file))
    }
}

/// Hands out source ports so that every probe is a new flow (a new 5-tuple, so no conntrack
/// entry of an earlier probe can answer for it), across processes: blocks of ports are
/// reserved in a counter file under a file lock.
pub struct PortAllocator {
    inner: Mutex<(u16, u16)>,
    /// Ports never handed out: the ports servers listen on.
    avoid: Mutex<BTreeSet<u16>>,
}

const BLOCK: u16 = 256;

impl Default for PortAllocator {
    fn default() -> Self {
        PortAllocator {
            inner: Mutex::new((0, 0)),
            avoid: Mutex::new(BTreeSet::new()),
        }
    }
}

impl PortAllocator {
    pub fn avoid(&self, port: u16) {
        self.avoid.lock().unwrap().insert(port);
    }

    pub fn next(&self) -> u16 {
        let mut inner = self.inner.lock().unwrap();
        loop {
            if inner.0 >= inner.1 {
                let start = reserve_block().unwrap_or_else(|e| {
                    eprintln!("lab: port counter: {e}; using a time-based block");
                    time_seed()
                });
                *inner = (start, start + BLOCK);
            }
            let port = inner.0;
            inner.0 += 1;
            if !self.avoid.lock().unwrap().contains(&port) {
                return port;
            }
        }
    }
}

fn time_seed() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let blocks = (PROBE_PORTS.end - PROBE_PORTS.start) / BLOCK;
    PROBE_PORTS.start + (nanos % blocks as u128) as u16 * BLOCK
}

/// Reserves the next block in the counter file, wrapping around the probe port range.
fn reserve_block() -> Result<u16, LabError> {
    fs::create_dir_all(STATE_DIR).map_err(io_err(STATE_DIR))?;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path("next-port"))
        .map_err(io_err("opening the port counter"))?;
    file.lock().map_err(io_err("locking the port counter"))?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(io_err("reading the port counter"))?;
    let start = match text.trim().parse::<u16>() {
        Ok(p) if PROBE_PORTS.contains(&p) && p + BLOCK <= PROBE_PORTS.end => p,
        Ok(_) => PROBE_PORTS.start,
        Err(_) => time_seed(),
    };
    let mut next = start + BLOCK;
    if next + BLOCK > PROBE_PORTS.end {
        next = PROBE_PORTS.start;
    }
    file.set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(next.to_string().as_bytes()))
        .map_err(io_err("writing the port counter"))?;
    Ok(start)
}

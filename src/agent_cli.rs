//! `tandem host agent`: its arguments, checked, then `cluster::agent`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// This host's name in the cluster (lowercase letters, digits, '-').
    #[arg(long)]
    pub name: String,
    /// The cluster store: etcd client URLs, comma-separated (http://IP:PORT,...).
    #[arg(long, value_name = "URLS")]
    pub store: String,
    /// The shared storage folder (the same on every host): VMs' datastores, FT state.
    #[arg(long, value_name = "DIR")]
    pub shared: PathBuf,
    /// The bridge VMs' NICs join on this host.
    #[arg(long, value_name = "BR", default_value = "br-vm")]
    pub vm_bridge: String,
    /// The VM network's uplink on this host (the VM bridge's port towards the network):
    /// every copy watches its carrier, and a primary whose uplink is down hands its VM over
    /// to a secondary whose uplink is up.
    #[arg(long, value_name = "IFACE")]
    pub vm_uplink: Option<String>,
    /// An address on the VM network every copy probes through the uplink (repeatable, at
    /// most 16): a host from whose uplink none of them answers has lost its VM network,
    /// carrier or not. Needs --vm-uplink.
    #[arg(long = "vm-peer", value_name = "IP")]
    pub vm_peers: Vec<std::net::Ipv4Addr>,
    /// Passed to every copy: a storage or uplink failure counts only once it has lasted
    /// this long (default: the copies' own, 150 ms).
    #[arg(long, value_name = "MS")]
    pub health_hold_ms: Option<u64>,
    /// Passed to every copy: a primary never hands its VM over because of its host's
    /// storage or uplink (losses are still reported, and make the VM not protected).
    #[arg(long)]
    pub no_health_handover: bool,
    /// This host's IPv4 address on the logging network (FT logging channels listen there).
    #[arg(long, value_name = "IP")]
    pub log_ip: std::net::Ipv4Addr,
    /// Where this host serves the REST API.
    #[arg(long, value_name = "IP:PORT")]
    pub api: std::net::SocketAddr,
    /// Memory this host offers VMs, MiB (default: the machine's total memory).
    #[arg(long, value_name = "MIB")]
    pub memory_mib: Option<u64>,
    /// The file holding the cluster's API token (its first line; default <shared>/.token).
    /// Every API route and the dashboard require it, but /metrics and /healthz.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Where the copies' logs go (default /var/lib/tandem/agent-NAME).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Announce this Tandem version instead of the binary's: for testing the placement
    /// rule that both copies of a VM run the same version (a rolling upgrade in a lab).
    #[arg(long, value_name = "VERSION", hide = true)]
    pub advertise_version: Option<String>,
}

fn machine_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(4096, |kib| kib / 1024)
}

pub fn run(a: &AgentArgs) -> Result<u8> {
    if !a.shared.is_dir() {
        bail!("--shared {}: no such folder", a.shared.display());
    }
    if let Some(i) = &a.vm_uplink
        && !lockstep::health::valid_ifname(i)
    {
        bail!("--vm-uplink {i:?}: an interface name is 1-15 letters, digits, '_', '.' or '-'");
    }
    if !a.vm_peers.is_empty() && a.vm_uplink.is_none() {
        bail!("--vm-peer: peers are probed through the uplink: give --vm-uplink too");
    }
    if a.vm_peers.len() > lockstep::health::MAX_PEERS {
        bail!(
            "--vm-peer given {} times: at most {}",
            a.vm_peers.len(),
            lockstep::health::MAX_PEERS
        );
    }
    if let Some(ms) = a.health_hold_ms
        && (ms == 0 || ms > crate::MAX_FT_MS)
    {
        bail!("--health-hold-ms {ms} is outside 1..={}", crate::MAX_FT_MS);
    }
    let token_file = a
        .token_file
        .clone()
        .unwrap_or_else(|| a.shared.join(".token"));
    let token = api::client::read_token(&token_file).with_context(
        || "the API needs a token: pass --token-file FILE (`tandem lab up` writes <shared>/.token)",
    )?;
    let store = cluster::store::Store::connect(&a.store).context("--store")?;
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let cfg = cluster::agent::AgentConfig {
        name: a.name.clone(),
        store: store.clone(),
        shared: a.shared.clone(),
        vm_bridge: a.vm_bridge.clone(),
        vm_uplink: a.vm_uplink.clone(),
        vm_peers: a.vm_peers.clone(),
        health_hold_ms: a.health_hold_ms,
        no_health_handover: a.no_health_handover,
        log_ip: a.log_ip.to_string(),
        api: format!("http://{}", a.api),
        memory_mib: a.memory_mib.unwrap_or_else(machine_memory_mib),
        version: a
            .advertise_version
            .clone()
            .unwrap_or_else(|| crate::VERSION.to_string()),
        fingerprint: machine::engine_fingerprint(),
        exe,
        state_dir: a
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/var/lib/tandem/agent-{}", a.name))),
    };
    // The store may still be starting (a lab coming up): wait for it, bounded.
    let mut tries = 0;
    while let Err(e) = store.ping() {
        tries += 1;
        if tries > 100 {
            bail!("the cluster store {} does not answer: {e}", a.store);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut agent = None;
    for _ in 0..(2 * cluster::agent::LEASE_TTL_SECS as usize * 5) {
        match cluster::agent::Agent::register(cfg.clone()) {
            Ok(ag) => {
                agent = Some(ag);
                break;
            }
            // A restarted agent waits for its earlier life's lease to expire.
            Err(cluster::ClusterError::Conflict(why)) => {
                tracing::info!("{why}; waiting");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let agent = agent.context("the host name stays registered by another agent")?;
    let verbs = cluster::verbs::Verbs::new(store, a.shared.clone());
    let _server = api::server::serve(
        a.api,
        verbs,
        api::server::AgentInfo {
            host: a.name.clone(),
            token: Some(token),
            token_hint: token_file.display().to_string(),
        },
    )
    .with_context(|| format!("serving the API on {}", a.api))?;
    let stop = agent.stopper();
    std::thread::spawn(move || {
        while !machine::stop_requested() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
    });
    agent.run()?;
    Ok(0)
}

//! `tandem lab`: a cluster on one machine, made of network namespaces.
//!
//! A lab named NAME is:
//! - `NAME-net`: the switches: `sw0` (the VM network 10.77.0.0/24), `lg0` (the logging
//!   network 10.78.0.0/24) and `mg0` (the management network 10.79.0.0/24, the bridge
//!   itself at 10.79.0.1, where the lab's etcd member listens);
//! - `NAME-client`: a client machine, `eth0` 10.77.0.2/24 on `sw0`, `mgmt0` 10.79.0.2/24
//!   on `mg0`;
//! - `NAME-hostK`: host K, with a VM bridge `br-vm` whose uplink is a port of `sw0` (so a
//!   VM's tap on `br-vm` is on the VM network), `log0` 10.78.0.(10+K)/24 on `lg0` and
//!   `mgmt0` 10.79.0.(10+K)/24 on `mg0`;
//! - `/tmp/NAME-shared`: the shared storage folder; unless made `--plain-storage`, every host
//!   sees it through a view of its own, served by the host's storage server in the host's
//!   own mount namespace (see [`crate::labstore`]); whatever the lab runs on a host (agents,
//!   VMs: [`on_host`], `lab exec`) joins that namespace, so `lab cut HOST storage` takes the
//!   storage away from that host alone;
//! - unless made `--bare`: one etcd member in `NAME-net` (data `/tmp/NAME-etcd`, log
//!   `/tmp/NAME-etcd.log`), a host agent in every host (log `/tmp/NAME-hostK-agent.log`),
//!   and the lab file `/tmp/NAME-lab.json` saying where they are. The lab file exists only
//!   for a lab that runs a cluster.
//!
//! Faults: `kill` (links down in the host, every process SIGKILLed, its storage server
//! last), `isolate`, `cut HOST storage|uplink|logging` (a link is cut at the switch: its
//! port in `NAME-net` goes down, so the host's end loses carrier) and their undoing
//! (`revive`, `heal`).
//!
//! Every link is created inside its namespaces, so several labs can exist at once. `down`
//! kills what runs in the namespaces (etcd and the agents included), deletes them (which
//! deletes their links) and the files above; it is idempotent. Processes the lab starts
//! are detached (their own session): they outlive the `tandem lab up` that started them.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub const CLIENT_IP: &str = "10.77.0.2";
/// The management network's bridge, where etcd listens.
pub const MGMT_BRIDGE_IP: &str = "10.79.0.1";
/// The client's address on the management network.
pub const CLIENT_MGMT_IP: &str = "10.79.0.2";
/// The lab's etcd, as agents and clients address it.
pub const STORE_URL: &str = "http://10.79.0.1:2379";
/// The port of every agent's REST API (on its host's management address).
pub const API_PORT: u16 = 7070;
/// How long `lab up` waits for etcd to answer.
const ETCD_WAIT: Duration = Duration::from_secs(10);

#[derive(clap::Subcommand)]
pub enum LabCommand {
    /// Create the lab: NAME-net (switches), NAME-client, NAME-host1..N, shared storage,
    /// and (unless --bare) etcd on the management network and a host agent on every host.
    Up {
        #[command(flatten)]
        lab: LabArgs,
        /// How many hosts.
        #[arg(long, default_value_t = 2)]
        hosts: u32,
        /// Only the namespaces and networks: no etcd, no agents, no lab file.
        #[arg(long)]
        bare: bool,
        /// Every host sees the shared folder itself, with no per-host view (no storage
        /// server, no mount namespace per host): `lab cut HOST storage` is then refused.
        #[arg(long)]
        plain_storage: bool,
    },
    /// Remove the lab and everything running in it.
    Down {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Fail a host: SIGKILL every process on it and cut its links.
    Kill {
        #[command(flatten)]
        lab: LabArgs,
        /// The host, e.g. host1.
        host: String,
    },
    /// Isolate a host: cut its links (VM, logging, management), its processes alive.
    Isolate {
        #[command(flatten)]
        lab: LabArgs,
        /// The host, e.g. host1.
        host: String,
    },
    /// Break one of a host's paths: `storage` (its view of the shared folder answers EIO
    /// to everything, open files included), `uplink` (its VM network link loses carrier)
    /// or `logging` (its logging link loses carrier). Its processes stay alive.
    Cut {
        #[command(flatten)]
        lab: LabArgs,
        /// The host, e.g. host1.
        host: String,
        /// What to break: storage, uplink or logging.
        what: String,
    },
    /// Undo `lab cut`: the path works again (files opened before a storage cut too).
    Heal {
        #[command(flatten)]
        lab: LabArgs,
        /// The host, e.g. host1.
        host: String,
        /// What to heal: storage, uplink or logging.
        what: String,
    },
    /// Run a command on a host: in its network namespace and its view of the shared
    /// storage (the process becomes the command: same pid).
    Exec {
        #[command(flatten)]
        lab: LabArgs,
        /// The host, e.g. host1.
        host: String,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<std::ffi::OsString>,
    },
    /// Internal: serve a host's view of the shared storage (started by `lab up`).
    #[command(hide = true)]
    StorageServe {
        #[command(flatten)]
        lab: LabArgs,
        /// The host, e.g. host1.
        host: String,
    },
    /// Bring a killed or isolated host back: links up, and its agent started again if it
    /// is not running (in a lab that runs a cluster).
    Revive {
        #[command(flatten)]
        lab: LabArgs,
        /// The host, e.g. host1.
        host: String,
    },
    /// Serve the lab's dashboard (and API) on this machine: each connection to LISTEN is
    /// relayed to the first agent that accepts it, from the lab's client machine (the
    /// management network is not reachable from here). Runs until interrupted.
    Dashboard {
        #[command(flatten)]
        lab: LabArgs,
        /// Where to listen on this machine (port 0: any free port).
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Write the address listened on to FILE once listening.
        #[arg(long, value_name = "FILE", hide = true)]
        addr_file: Option<PathBuf>,
    },
}

/// Carry out a `tandem lab` command.
pub fn run(cmd: LabCommand) -> Result<u8> {
    match cmd {
        LabCommand::Up {
            lab,
            hosts,
            bare,
            plain_storage,
        } => run_up(&lab, hosts, bare, !plain_storage),
        LabCommand::Cut { lab, host, what } => {
            let what = Fault::parse(&what, "cut")?;
            cut(&lab.name, &host, what, true)?;
            println!("lab {}: {host} {} cut", lab.name, what.name());
            Ok(0)
        }
        LabCommand::Heal { lab, host, what } => {
            let what = Fault::parse(&what, "heal")?;
            cut(&lab.name, &host, what, false)?;
            println!("lab {}: {host} {} healed", lab.name, what.name());
            Ok(0)
        }
        LabCommand::Exec { lab, host, cmd } => {
            let k = host_number(&lab.name, &host)?;
            crate::labstore::exec(&lab.name, k, &cmd)?;
            Ok(1)
        }
        LabCommand::StorageServe { lab, host } => {
            let k = host_number(&lab.name, &host)?;
            crate::labstore::serve(&lab.name, k)?;
            Ok(0)
        }
        LabCommand::Down { lab } => run_down(&lab),
        LabCommand::Kill { lab, host } => run_kill(&lab, &host),
        LabCommand::Isolate { lab, host } => {
            isolate(&lab.name, &host)?;
            println!(
                "lab {}: {host} isolated (links cut, processes alive)",
                lab.name
            );
            Ok(0)
        }
        LabCommand::Dashboard {
            lab,
            listen,
            addr_file,
        } => crate::lab_proxy::run(&lab.name, listen, addr_file.as_deref()),
        LabCommand::Revive { lab, host } => {
            let started = revive(&lab.name, &host)?;
            println!(
                "lab {}: {host} revived (links up{})",
                lab.name,
                if started { ", agent started" } else { "" }
            );
            Ok(0)
        }
    }
}

#[derive(clap::Args)]
pub struct LabArgs {
    /// The lab's name: prefix of its namespaces.
    #[arg(long, default_value = "tandem")]
    pub name: String,
}

pub fn ns(name: &str, what: &str) -> String {
    format!("{name}-{what}")
}

pub fn host_ns(name: &str, k: u32) -> String {
    ns(name, &format!("host{k}"))
}

pub fn shared_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/{name}-shared"))
}

/// `<shared>/.token`: the cluster's API token (mode 0600), which the agents require and the
/// CLI sends. Outside every VM's own folder, so no guest's datastore reaches it.
pub fn token_file(name: &str) -> PathBuf {
    shared_dir(name).join(".token")
}

/// A fresh token: 32 random bytes, hex, written to `path` readable by its owner only.
fn write_token(path: &std::path::Path) -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the API token")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `/tmp/NAME-run`: a folder of the machine's that every host and the machine itself see
/// as one (it is not shared storage), for the control sockets an operator on the machine
/// talks to: a Unix socket bound through one host's view of the shared storage is that
/// host's alone, as on any network file system.
pub fn run_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/{name}-run"))
}

/// `/tmp/NAME-lab.json`: where a lab's cluster is (see [`LabFile`]).
pub fn lab_file(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/{name}-lab.json"))
}

fn etcd_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/{name}-etcd"))
}

fn etcd_log(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/{name}-etcd.log"))
}

pub fn agent_log(name: &str, k: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/{name}-host{k}-agent.log"))
}

/// Where host K's agent keeps its copies' logs: on the lab's shared storage, so that
/// `lab down` removes them and a test that failed can show them.
pub fn agent_dir(name: &str, k: u32) -> PathBuf {
    shared_dir(name).join(".agents").join(format!("host{k}"))
}

/// Host K's address on the management network (its agent's API listens there).
pub fn mgmt_ip(k: u32) -> String {
    format!("10.79.0.{}", 10 + k)
}

/// Host K's address on the logging network.
pub fn log_ip(k: u32) -> String {
    format!("10.78.0.{}", 10 + k)
}

/// What `/tmp/NAME-lab.json` says: how clients (run in `netns`) reach the lab's cluster.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LabFile {
    pub name: String,
    /// The namespace to run clients in (the management network is reachable from it).
    pub netns: String,
    /// The etcd endpoint(s).
    pub store: String,
    /// Every host's agent API, `http://IP:PORT`, host1 first.
    pub apis: Vec<String>,
    pub hosts: u32,
    /// The API token's file (mode 0600): the agents require the token, the CLI sends it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The dashboard from this machine: `http://127.0.0.1:PORT`, the lab's relay
    /// (`tandem lab dashboard`, started by `lab up` and stopped by `lab down`).
    #[serde(default)]
    pub dashboard: Option<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// Namespaces of lab `name` that exist now.
pub fn namespaces(name: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let Ok(out) = out else { return vec![] };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        // Exactly this lab's: `tandem` must not take `tandem-demo`'s namespaces.
        .filter(|n| {
            n.strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|what| {
                    what == "net"
                        || what == "client"
                        || what
                            .strip_prefix("host")
                            .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
                })
        })
        .map(str::to_string)
        .collect()
}

fn valid_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 24
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bail!("lab name {name:?}: use 1-24 letters, digits or '-'");
    }
    Ok(())
}

/// A veth pair between two namespaces, created in place.
fn veth(a_ns: &str, a: &str, b_ns: &str, b: &str) -> Result<()> {
    ip(&[
        "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns,
    ])
}

/// A bridge in `ns` that forwards at once: one that waits for spanning tree would eat the
/// first frames of every test and demo.
fn bridge(ns: &str, name: &str) -> Result<()> {
    in_ns(ns, &["link", "add", name, "type", "bridge"])?;
    in_ns(
        ns,
        &[
            "link",
            "set",
            name,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ],
    )?;
    in_ns(ns, &["link", "set", name, "up"])
}

/// The kernel's bridge netfilter hooks off in `ns`: a switch between hosts forwards frames
/// and does not run them through the machine's firewall tables. With `br_netfilter` loaded
/// every namespace starts with them on (`net.bridge.bridge-nf-call-*` = 1), and every frame a
/// lab bridge forwards (the logging channel's above all) then pays for a trip through them
/// in the sending thread's softirq. Without `br_netfilter` there is nothing to turn off.
fn plain_switching(ns: &str) -> Result<()> {
    const SCRIPT: &str = "for t in iptables ip6tables arptables; do \
        f=/proc/sys/net/bridge/bridge-nf-call-$t; \
        if [ -e \"$f\" ]; then echo 0 > \"$f\" || exit 1; fi; done";
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", SCRIPT])
        .output()
        .context("running ip netns exec (iproute2)")?;
    if !out.status.success() {
        bail!(
            "turning bridge netfilter off in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Create lab `name` with `hosts` hosts, bare: namespaces and networks only (what the
/// FT tests, the demo and the benchmarks use). See [`up_cluster`] for etcd and agents.
pub fn up(name: &str, hosts: u32) -> Result<()> {
    up_with(name, hosts, false, true)
}

/// Create lab `name` with `hosts` hosts running a cluster: etcd on the management network
/// (waited for), a host agent started in every host (not waited for), the lab file.
pub fn up_cluster(name: &str, hosts: u32) -> Result<()> {
    up_with(name, hosts, true, true)
}

/// `views`: every host sees the shared folder through its own storage server (see
/// [`crate::labstore`]), which `lab cut HOST storage` can break.
fn up_with(name: &str, hosts: u32, cluster: bool, views: bool) -> Result<()> {
    valid_name(name)?;
    if !(1..=16).contains(&hosts) {
        bail!("--hosts {hosts}: a lab has 1 to 16 hosts");
    }
    if !namespaces(name).is_empty() {
        bail!("lab {name} is already up: `tandem lab down --name {name}` first");
    }
    // What a lab that was never taken down left behind (a stale cluster state above all).
    stop_relay(name);
    remove_files(name);
    let result = build(name, hosts, views).and_then(|()| {
        if cluster {
            start_cluster(name, hosts)
        } else {
            Ok(())
        }
    });
    if result.is_err() {
        down(name);
    }
    result
}

fn build(name: &str, hosts: u32, views: bool) -> Result<()> {
    let net = ns(name, "net");
    let client = ns(name, "client");
    for n in std::iter::once(net.clone())
        .chain([client.clone()])
        .chain((1..=hosts).map(|k| host_ns(name, k)))
    {
        ip(&["netns", "add", &n])?;
        in_ns(&n, &["link", "set", "lo", "up"])?;
    }
    plain_switching(&net)?;
    for br in ["sw0", "lg0", "mg0"] {
        bridge(&net, br)?;
    }
    in_ns(
        &net,
        &["addr", "add", &format!("{MGMT_BRIDGE_IP}/24"), "dev", "mg0"],
    )?;
    veth(&client, "eth0", &net, "client")?;
    in_ns(&net, &["link", "set", "client", "master", "sw0", "up"])?;
    in_ns(
        &client,
        &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"],
    )?;
    in_ns(&client, &["link", "set", "eth0", "up"])?;
    mgmt_port(&net, &client, "clientmg", CLIENT_MGMT_IP)?;
    for k in 1..=hosts {
        let h = host_ns(name, k);
        plain_switching(&h)?;
        bridge(&h, "br-vm")?;
        let up_port = format!("h{k}up");
        veth(&h, "uplink", &net, &up_port)?;
        in_ns(&h, &["link", "set", "uplink", "master", "br-vm", "up"])?;
        in_ns(&net, &["link", "set", &up_port, "master", "sw0", "up"])?;
        let lg_port = format!("h{k}log");
        veth(&h, "log0", &net, &lg_port)?;
        in_ns(
            &h,
            &[
                "addr",
                "add",
                &format!("10.78.0.{}/24", 10 + k),
                "dev",
                "log0",
            ],
        )?;
        in_ns(&h, &["link", "set", "log0", "up"])?;
        in_ns(&net, &["link", "set", &lg_port, "master", "lg0", "up"])?;
        mgmt_port(&net, &h, &format!("h{k}mg"), &mgmt_ip(k))?;
    }
    std::fs::create_dir_all(shared_dir(name)).context("creating the shared storage folder")?;
    std::fs::create_dir_all(run_dir(name)).context("creating the lab's socket folder")?;
    if views {
        std::fs::write(crate::labstore::marker(name), b"")
            .context("marking the lab as one with storage views")?;
        for k in 1..=hosts {
            crate::labstore::start(name, k)?;
        }
    }
    Ok(())
}

/// `mgmt0` with address `ip` in namespace `ns`, its peer `port` a port of `mg0`.
fn mgmt_port(net: &str, ns: &str, port: &str, ip: &str) -> Result<()> {
    veth(ns, "mgmt0", net, port)?;
    in_ns(ns, &["addr", "add", &format!("{ip}/24"), "dev", "mgmt0"])?;
    in_ns(ns, &["link", "set", "mgmt0", "up"])?;
    in_ns(net, &["link", "set", port, "master", "mg0", "up"])
}

/// Start a command detached (its own session, stdin closed, output appended to `log`)
/// in namespace `ns`; the child is reaped by a thread of its own, so a long-lived caller
/// (the demo, a benchmark) collects no zombies.
fn spawn_detached(
    place: &[std::ffi::OsString],
    program: &std::ffi::OsStr,
    args: &[String],
    log: &std::path::Path,
) -> Result<std::process::Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    // `setsid` execs (a spawned child leads no process group), so the child is the
    // program itself once `ip netns exec` or `lab exec` execs it too.
    Command::new("setsid")
        .args(place)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} in {}",
                program.to_string_lossy(),
                place
                    .last()
                    .map(|p| p.to_string_lossy())
                    .unwrap_or_default()
            )
        })
}

/// The command prefix that runs a program in namespace `ns`.
fn netns_exec(ns: &str) -> Vec<std::ffi::OsString> {
    ["ip", "netns", "exec", ns].map(Into::into).to_vec()
}

/// The command prefix that runs a program on host K of lab `name`: `tandem lab exec`
/// (its network namespace and its view of the shared storage) in a lab with storage
/// views, `ip netns exec` in one without.
pub fn on_host(name: &str, k: u32) -> Result<Vec<std::ffi::OsString>> {
    if !crate::labstore::enabled(name) {
        return Ok(netns_exec(&host_ns(name, k)));
    }
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let mut v = vec![exe.into_os_string()];
    v.extend(
        ["lab", "exec", "--name", name, &format!("host{k}"), "--"].map(std::ffi::OsString::from),
    );
    Ok(v)
}

/// [`on_host`] for a namespace named `NAME-hostK`; `ip netns exec` for any other.
fn on_host_ns(ns: &str) -> Result<Vec<std::ffi::OsString>> {
    match ns.rsplit_once("-host").map(|(n, k)| (n, k.parse::<u32>())) {
        Some((name, Ok(k))) => on_host(name, k),
        _ => Ok(netns_exec(ns)),
    }
}

fn reap_in_background(mut child: std::process::Child) {
    std::thread::spawn(move || {
        let _ = child.wait();
    });
}

/// etcd in `NAME-net`, waited for; then an agent on every host; then the lab file.
fn start_cluster(name: &str, hosts: u32) -> Result<()> {
    let net = ns(name, "net");
    let peer = format!("http://{MGMT_BRIDGE_IP}:2380");
    let args = vec![
        format!("--name={name}"),
        format!("--data-dir={}", etcd_dir(name).display()),
        format!("--listen-client-urls={STORE_URL}"),
        format!("--advertise-client-urls={STORE_URL}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster={name}={peer}"),
        "--initial-cluster-state=new".to_string(),
    ];
    let mut etcd = spawn_detached(&netns_exec(&net), "etcd".as_ref(), &args, &etcd_log(name))
        .context("etcd (scripts/setup installs etcd-server; `lab up --bare` runs without it)")?;
    let deadline = Instant::now() + ETCD_WAIT;
    loop {
        if let Ok(Some(status)) = etcd.try_wait() {
            bail!(
                "etcd exited at start ({status}); {}:\n{}",
                etcd_log(name).display(),
                tail(&etcd_log(name), 10)
            );
        }
        if etcd_answers(&net) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "etcd did not answer at {STORE_URL} within {ETCD_WAIT:?}; {}:\n{}",
                etcd_log(name).display(),
                tail(&etcd_log(name), 10)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reap_in_background(etcd);
    write_token(&token_file(name))?;
    for k in 1..=hosts {
        start_agent(name, k)?;
    }
    let file = LabFile {
        name: name.to_string(),
        netns: ns(name, "client"),
        store: STORE_URL.to_string(),
        apis: (1..=hosts)
            .map(|k| format!("http://{}:{API_PORT}", mgmt_ip(k)))
            .collect(),
        hosts,
        token_file: Some(token_file(name)),
        dashboard: None,
    };
    write_lab_file(&file)?;
    // The relay reads the lab file; the lab file then says where the relay listens.
    let dashboard = start_relay(name)?;
    write_lab_file(&LabFile {
        dashboard: Some(format!("http://{dashboard}")),
        ..file
    })
}

fn write_lab_file(file: &LabFile) -> Result<()> {
    let path = lab_file(&file.name);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(file)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Where the lab's dashboard relay says it listens, and its pid.
fn relay_files(name: &str) -> (PathBuf, PathBuf) {
    let dir = run_dir(name);
    (dir.join("dashboard.addr"), dir.join("dashboard.pid"))
}

/// Start the lab's dashboard relay on this machine (`lab dashboard` on a free port of
/// 127.0.0.1, detached) and return the address it listens on.
fn start_relay(name: &str) -> Result<std::net::SocketAddr> {
    let (addr_file, pid_file) = relay_files(name);
    let _ = std::fs::remove_file(&addr_file);
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let args: Vec<String> = [
        "lab",
        "dashboard",
        "--name",
        name,
        "--listen",
        "127.0.0.1:0",
        "--addr-file",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([addr_file.display().to_string()])
    .collect();
    let log = PathBuf::from(format!("/tmp/{name}-dashboard.log"));
    let child = spawn_detached(&[], exe.as_os_str(), &args, &log)?;
    std::fs::write(&pid_file, child.id().to_string())
        .with_context(|| format!("writing {}", pid_file.display()))?;
    reap_in_background(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(a) = std::fs::read_to_string(&addr_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Ok(a);
        }
        if Instant::now() > deadline {
            bail!(
                "the dashboard relay did not start within 10 s: {}",
                tail(&log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stop the lab's dashboard relay, if its pid file names one still running as it.
fn stop_relay(name: &str) {
    let (_, pid_file) = relay_files(name);
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    // Only the relay of this lab: a pid reused by another process is left alone.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = words.contains(&b"dashboard".as_slice()) && words.contains(&name.as_bytes());
    if !ours {
        return;
    }
    // SIGKILL: the relay keeps no state, and tandem's SIGTERM handler stops VMs, not it.
    // SAFETY: kill(2) with a pid read above and a valid signal number; it touches no
    // memory of ours.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the lab's etcd reports itself healthy, asked from inside `NAME-net` (the
/// management network is not reachable from where `lab up` runs).
fn etcd_answers(net: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", net, "curl", "-s", "-m", "1"])
        .arg(format!("{STORE_URL}/health"))
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""))
}

/// The last `n` lines of a log, for error messages.
fn tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Start host K's agent (detached, output appended to `/tmp/NAME-hostK-agent.log`) with
/// this very binary. Not waited for: an agent that cannot start says why in its log.
pub fn start_agent(name: &str, k: u32) -> Result<()> {
    let h = host_ns(name, k);
    if !namespaces(name).contains(&h) {
        bail!("lab {name} has no host{k}");
    }
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let args: Vec<String> = [
        "host",
        "agent",
        "--name",
        &format!("host{k}"),
        "--store",
        STORE_URL,
        "--shared",
        &shared_dir(name).display().to_string(),
        "--vm-bridge",
        "br-vm",
        "--vm-uplink",
        "uplink",
        // The client machine's address: a host from whose uplink it cannot be reached has
        // lost its VM network, carrier or not (the hosts have no VM-network addresses).
        "--vm-peer",
        CLIENT_IP,
        "--log-ip",
        &log_ip(k),
        "--api",
        &format!("{}:{API_PORT}", mgmt_ip(k)),
        "--state-dir",
        &agent_dir(name, k).display().to_string(),
        "--token-file",
        &token_file(name).display().to_string(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let child = spawn_detached(
        &on_host(name, k)?,
        exe.as_os_str(),
        &args,
        &agent_log(name, k),
    )?;
    reap_in_background(child);
    Ok(())
}

/// Whether a `tandem host agent` runs in namespace `ns`.
fn agent_running(ns: &str) -> bool {
    pids(ns).into_iter().any(|pid| {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        args.windows(2).any(|w| w[0] == b"host" && w[1] == b"agent")
    })
}

/// The processes in a namespace.
fn pids(ns: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kill every process in a namespace with SIGKILL; a host's storage server last, once
/// the processes that use its view are gone (bounded wait), so none of them sees its
/// storage fail before it dies.
fn kill_all(ns: &str) {
    let server = ns
        .rsplit_once("-host")
        .and_then(|(name, k)| Some((name, k.parse::<u32>().ok()?)))
        .and_then(|(name, k)| crate::labstore::server_pid(name, k));
    let others =
        |pids: Vec<i32>| -> Vec<i32> { pids.into_iter().filter(|&p| Some(p) != server).collect() };
    for pid in others(pids(ns)) {
        // SAFETY: kill(2) with a pid read from the kernel; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Some(server) = server {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !others(pids(ns)).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill(2) with a pid checked to be the storage server; no memory.
        unsafe { libc::kill(server, libc::SIGKILL) };
        // A killed host runs nothing once `lab kill` returns: the server's FUSE teardown
        // can outlast the signal by a few milliseconds.
        let deadline = Instant::now() + Duration::from_secs(3);
        while pids(ns).contains(&server) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The files of lab `name` outside its namespaces: shared storage, etcd's data and log,
/// the agents' logs, the lab file.
fn remove_files(name: &str) {
    let _ = std::fs::remove_dir_all(shared_dir(name));
    let _ = std::fs::remove_dir_all(run_dir(name));
    let _ = std::fs::remove_dir_all(etcd_dir(name));
    let _ = std::fs::remove_file(etcd_log(name));
    let _ = std::fs::remove_file(lab_file(name));
    let _ = std::fs::remove_file(format!("/tmp/{name}-dashboard.log"));
    let _ = std::fs::remove_file(crate::labstore::marker(name));
    // Agent logs and storage servers' state and logs of any host number (the lab may have had more hosts than are left).
    let prefix = format!("{name}-host");
    if let Ok(dir) = std::fs::read_dir("/tmp") {
        for e in dir.flatten() {
            let f = e.file_name();
            let f = f.to_string_lossy();
            let is_agent_log = f.strip_prefix(&prefix).is_some_and(|r| {
                ["-agent.log", "-storage", "-storage.log", "-storage.tmp"]
                    .iter()
                    .filter_map(|s| r.strip_suffix(s))
                    .any(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            });
            if is_agent_log {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Remove lab `name`: kill what runs in it (etcd and agents too), delete its namespaces
/// and files. Removing what is already gone is not an error.
pub fn down(name: &str) {
    stop_relay(name);
    let all = namespaces(name);
    for n in &all {
        kill_all(n);
    }
    for n in &all {
        let _ = ip(&["netns", "delete", n]);
    }
    remove_files(name);
}

/// Every link of a host to the outside: VM network, logging, management.
const HOST_LINKS: [&str; 3] = ["uplink", "log0", "mgmt0"];

/// `host` (`hostK`) of lab `name`: its K, checked to exist.
fn host_number(name: &str, host: &str) -> Result<u32> {
    let k = host
        .strip_prefix("host")
        .and_then(|k| k.parse::<u32>().ok())
        .filter(|k| (1..=16).contains(k));
    match k {
        Some(k) if namespaces(name).contains(&host_ns(name, k)) => Ok(k),
        _ => bail!("lab {name} has no host {host:?} (hosts are host1, host2, ...)"),
    }
}

/// Every link of host K up or down: each one tried, the first failure reported.
fn set_links(name: &str, k: u32, state: &str) -> Result<()> {
    let h = host_ns(name, k);
    HOST_LINKS
        .iter()
        .map(|link| in_ns(&h, &["link", "set", link, state]))
        .fold(Ok(()), Result::and)
}

/// A host failure: SIGKILL every process of host `k` and cut its links.
pub fn kill(name: &str, host: &str) -> Result<()> {
    let k = host_number(name, host)?;
    // Links first: a host that dies says nothing, so its peers must not see a FIN or a
    // reset from the kernel closing its sockets, only silence. Its agent's lease then
    // expires in etcd.
    let _ = set_links(name, k, "down");
    kill_all(&host_ns(name, k));
    Ok(())
}

/// A network isolation: cut every link of `host`, its processes left running (its agent
/// cannot renew its lease; its VMs cannot be reached).
pub fn isolate(name: &str, host: &str) -> Result<()> {
    let k = host_number(name, host)?;
    set_links(name, k, "down")
}

/// Undo [`kill`] or [`isolate`]: links up, and, in a lab that runs a cluster, the host's
/// agent started again if none runs there. Whether an agent was started.
pub fn revive(name: &str, host: &str) -> Result<bool> {
    let k = host_number(name, host)?;
    set_links(name, k, "up")?;
    if crate::labstore::enabled(name) && crate::labstore::server_pid(name, k).is_none() {
        crate::labstore::start(name, k)?;
    }
    if lab_file(name).is_file() && !agent_running(&host_ns(name, k)) {
        start_agent(name, k)?;
        return Ok(true);
    }
    Ok(false)
}

/// What `lab cut` breaks on a host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Its view of the shared storage (its storage server answers EIO).
    Storage,
    /// Its VM network link (`uplink`, the VM bridge's port on `sw0`).
    Uplink,
    /// Its logging link (`log0`, on `lg0`).
    Logging,
}

impl Fault {
    /// `what` names a path to `verb` (cut or heal).
    pub fn parse(what: &str, verb: &str) -> Result<Fault> {
        match what {
            "storage" => Ok(Fault::Storage),
            "uplink" => Ok(Fault::Uplink),
            "logging" => Ok(Fault::Logging),
            _ => bail!("cannot {verb} {what:?}: say storage, uplink or logging"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::Storage => "storage",
            Fault::Uplink => "uplink",
            Fault::Logging => "logging",
        }
    }
}

/// Cut (`true`) or heal one path of `host`. A link is cut at the switch: its port in
/// `NAME-net` goes down, so the host's end loses carrier (as when a cable or a switch
/// port fails), and the host's own settings are left alone.
pub fn cut(name: &str, host: &str, what: Fault, cut: bool) -> Result<()> {
    let k = host_number(name, host)?;
    let state = if cut { "down" } else { "up" };
    let (port, link) = match what {
        Fault::Storage => return crate::labstore::set_cut(name, k, cut),
        Fault::Uplink => (format!("h{k}up"), "uplink"),
        Fault::Logging => (format!("h{k}log"), "log0"),
    };
    in_ns(&ns(name, "net"), &["link", "set", &port, state])?;
    // The kernel reports a carrier change with a delay of its own (up to a second):
    // the command returns once the host sees it, so what runs next sees it too.
    let h = host_ns(name, k);
    let deadline = Instant::now() + Duration::from_secs(5);
    let net = ns(name, "net");
    let settled = || {
        if cut {
            !carrier(&h, link)
        } else {
            carrier(&h, link) && carrier(&net, &port) && forwarding(&net, &port)
        }
    };
    while !settled() {
        if Instant::now() > deadline {
            bail!("{host}'s {link} did not see its carrier {state} within 5 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Whether bridge port `port` in namespace `ns` forwards frames.
fn forwarding(ns: &str, port: &str) -> bool {
    Command::new("bridge")
        .args(["-n", ns, "link", "show", "dev", port])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("state forwarding"))
}

/// Whether `dev` in namespace `ns` has a carrier (and is up).
fn carrier(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", dev])
        .output()
        .is_ok_and(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            s.contains("LOWER_UP") && !s.contains("NO-CARRIER")
        })
}

pub fn run_up(a: &LabArgs, hosts: u32, bare: bool, views: bool) -> Result<u8> {
    up_with(&a.name, hosts, !bare, views)?;
    println!(
        "lab {} up: {} hosts ({}), client {} ({CLIENT_IP}), switch {}, shared storage {}",
        a.name,
        hosts,
        (1..=hosts)
            .map(|k| host_ns(&a.name, k))
            .collect::<Vec<_>>()
            .join(" "),
        ns(&a.name, "client"),
        ns(&a.name, "net"),
        shared_dir(&a.name).display()
    );
    if views {
        println!(
            "storage: every host sees {} through its own view (`lab exec` runs a command there; `lab cut HOST storage` breaks it)",
            shared_dir(&a.name).display()
        );
    }
    if !bare {
        println!(
            "cluster: etcd {STORE_URL} (log {}), agents' APIs {}:{API_PORT} (logs /tmp/{}-hostK-agent.log), lab file {}",
            etcd_log(&a.name).display(),
            (1..=hosts).map(mgmt_ip).collect::<Vec<_>>().join(","),
            a.name,
            lab_file(&a.name).display()
        );
        let here = std::fs::read_to_string(relay_files(&a.name).0).unwrap_or_default();
        println!(
            "dashboard: http://{}/ on this machine (relayed to the agents; from the client machine {}: http://{}:{API_PORT}/); API token {}",
            here.trim(),
            ns(&a.name, "client"),
            mgmt_ip(1),
            token_file(&a.name).display()
        );
    }
    Ok(0)
}

pub fn run_down(a: &LabArgs) -> Result<u8> {
    down(&a.name);
    println!("lab {} down", a.name);
    Ok(0)
}

pub fn run_kill(a: &LabArgs, host: &str) -> Result<u8> {
    kill(&a.name, host)?;
    println!(
        "lab {}: {host} killed (processes SIGKILLed, links cut)",
        a.name
    );
    Ok(0)
}

/// Removes a lab however the code that made it ends.
pub struct LabGuard(pub String);

impl Drop for LabGuard {
    fn drop(&mut self) {
        crate::lab::down(&self.0);
    }
}

/// A VM process in a lab host, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct VmProcess(pub std::process::Child);

impl VmProcess {
    /// Start `tandem ARGS` in namespace `host_ns`, its output to `out` (or nowhere).
    pub fn start(host_ns: &str, args: &[&str]) -> Result<Self> {
        Self::start_logged(host_ns, args, None)
    }

    pub fn start_logged(
        host_ns: &str,
        args: &[&str],
        out: Option<&std::path::Path>,
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("finding the tandem binary")?;
        let place = on_host_ns(host_ns)?;
        let child = Command::new(&place[0])
            .args(&place[1..])
            .arg(exe)
            .args(args)
            .stdout(match out {
                Some(p) => std::fs::File::create(p)?.into(),
                None => std::process::Stdio::null(),
            })
            .stderr(match out {
                Some(p) => std::fs::OpenOptions::new().append(true).open(p)?.into(),
                None => std::process::Stdio::null(),
            })
            .spawn()
            .context("starting a VM")?;
        Ok(VmProcess(child))
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        for _ in 0..200 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

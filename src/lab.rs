//! `tandem lab`: a cluster on one machine, made of network namespaces.
//!
//! A lab named NAME is:
//! - `NAME-net`: the switches: `sw0` (the VM network 10.77.0.0/24) and `lg0` (the logging
//!   network 10.78.0.0/24);
//! - `NAME-client`: a client machine, `eth0` 10.77.0.2/24 on `sw0`;
//! - `NAME-hostK`: host K, with a VM bridge `br-vm` whose uplink is a port of `sw0` (so a
//!   VM's tap on `br-vm` is on the VM network), and `log0` 10.78.0.(10+K)/24 on `lg0`;
//! - `/tmp/NAME-shared`: the shared storage folder.
//!
//! Every link is created inside its namespaces, so several labs can exist at once. `down`
//! deletes the namespaces (which deletes their links) and kills what runs in them.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub const CLIENT_IP: &str = "10.77.0.2";

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
        .filter(|n| n.starts_with(&format!("{name}-")))
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

pub fn up(name: &str, hosts: u32) -> Result<()> {
    valid_name(name)?;
    if !(1..=16).contains(&hosts) {
        bail!("--hosts {hosts}: a lab has 1 to 16 hosts");
    }
    if !namespaces(name).is_empty() {
        bail!("lab {name} is already up: `tandem lab down --name {name}` first");
    }
    let result = build(name, hosts);
    if result.is_err() {
        down(name);
    }
    result
}

fn build(name: &str, hosts: u32) -> Result<()> {
    let net = ns(name, "net");
    let client = ns(name, "client");
    for n in std::iter::once(net.clone())
        .chain([client.clone()])
        .chain((1..=hosts).map(|k| host_ns(name, k)))
    {
        ip(&["netns", "add", &n])?;
        in_ns(&n, &["link", "set", "lo", "up"])?;
    }
    for br in ["sw0", "lg0"] {
        bridge(&net, br)?;
    }
    veth(&client, "eth0", &net, "client")?;
    in_ns(&net, &["link", "set", "client", "master", "sw0", "up"])?;
    in_ns(
        &client,
        &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"],
    )?;
    in_ns(&client, &["link", "set", "eth0", "up"])?;
    for k in 1..=hosts {
        let h = host_ns(name, k);
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
    }
    std::fs::create_dir_all(shared_dir(name)).context("creating the shared storage folder")?;
    Ok(())
}

/// Kill every process in a namespace with SIGKILL.
fn kill_all(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) with a pid read from the kernel; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Remove lab `name`: kill what runs in it, delete its namespaces and shared folder.
/// Removing what is already gone is not an error.
pub fn down(name: &str) {
    let all = namespaces(name);
    for n in &all {
        kill_all(n);
    }
    for n in &all {
        let _ = ip(&["netns", "delete", n]);
    }
    let _ = std::fs::remove_dir_all(shared_dir(name));
}

/// A host failure: SIGKILL every process of host `k` and cut its links.
pub fn kill(name: &str, host: &str) -> Result<()> {
    let h = ns(name, host);
    if !namespaces(name).contains(&h) {
        bail!("lab {name} has no host {host}");
    }
    // Links first: a host that dies says nothing, so its peers must not see a FIN or a
    // reset from the kernel closing its sockets, only silence.
    for link in ["uplink", "log0"] {
        let _ = in_ns(&h, &["link", "set", link, "down"]);
    }
    kill_all(&h);
    Ok(())
}

pub fn run_up(a: &LabArgs, hosts: u32) -> Result<u8> {
    up(&a.name, hosts)?;
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
        let child = Command::new("ip")
            .args(["netns", "exec", host_ns])
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

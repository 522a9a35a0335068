//! `tandem lab`: the management network, the lab's etcd and agents, the lab file, and
//! the host failures the cluster tests inject (kill, isolate, revive). Real namespaces,
//! real etcd, real curl and ping.

mod common;

use common::{Lab, Run, tandem};
use std::process::Command;

/// `CMD ARGS` in namespace `ns` (bounded in time).
fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> Run {
    let out = Command::new("timeout")
        .args(["20", "ip", "netns", "exec", ns, cmd])
        .args(args)
        .output()
        .expect("running a command in a namespace");
    Run::from(out)
}

fn pings(from_ns: &str, ip: &str) -> bool {
    in_ns(from_ns, "ping", &["-c", "1", "-W", "1", ip]).code == 0
}

/// etcd's JSON gateway at the lab's store, asked from `ns`.
fn etcd(ns: &str, path: &str, body: &str) -> String {
    let r = in_ns(
        ns,
        "curl",
        &[
            "-s",
            "-m",
            "3",
            "-d",
            body,
            &format!("http://10.79.0.1:2379{path}"),
        ],
    );
    r.stdout
}

fn pids(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_cluster_lab_runs_etcd_and_agents_on_the_management_network() {
    let lab = Lab::cluster("lc", 2);
    let name = lab.name().to_string();

    // The lab file says where everything is.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.lab_file()).expect("the lab file"))
            .expect("the lab file is JSON");
    assert_eq!(
        file,
        serde_json::json!({
            "name": name,
            "netns": lab.ns("client"),
            "store": "http://10.79.0.1:2379",
            "apis": ["http://10.79.0.11:7070", "http://10.79.0.12:7070"],
            "hosts": 2,
            "token_file": format!("/tmp/{name}-shared/.token"),
        })
    );
    // The API token: random, readable by its owner only.
    {
        use std::os::unix::fs::PermissionsExt;
        let token = format!("/tmp/{name}-shared/.token");
        let meta = std::fs::metadata(&token).expect("the token file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let t = std::fs::read_to_string(&token).unwrap();
        assert!(
            t.trim().len() == 64 && t.trim().bytes().all(|b| b.is_ascii_hexdigit()),
            "{t:?}"
        );
    }

    // One etcd, reachable from every host and the client: a key written from host1 is
    // read from host2 and from the client.
    let put = etcd(
        &lab.ns("host1"),
        "/v3/kv/put",
        r#"{"key":"a2V5","value":"dmFsdWU="}"#,
    );
    assert!(put.contains("revision"), "put from host1: {put}");
    for ns in [lab.ns("host2"), lab.ns("client")] {
        let got = etcd(&ns, "/v3/kv/range", r#"{"key":"a2V5"}"#);
        assert!(
            got.contains(r#""value":"dmFsdWU=""#),
            "range from {ns}: {got}"
        );
    }
    assert!(pings(&lab.ns("client"), "10.79.0.11"));
    assert!(pings(&lab.ns("host1"), "10.79.0.12"));
    // The agents were started (each says so in its log, or at least made it).
    for k in 1..=2 {
        assert!(lab.agent_log(k).is_file(), "host{k}'s agent log");
    }

    // Isolated: no link works, its processes live on.
    let sleeper = Command::new("ip")
        .args(["netns", "exec", &lab.ns("host1"), "sleep", "60"])
        .spawn()
        .expect("a process on host1");
    lab.host_op("isolate", 1);
    assert!(!pings(&lab.ns("client"), "10.79.0.11"), "management cut");
    assert!(!pings(&lab.ns("host2"), "10.78.0.11"), "logging cut");
    let cut = etcd(&lab.ns("host1"), "/v3/kv/range", r#"{"key":"a2V5"}"#);
    assert!(!cut.contains("value"), "etcd unreachable from host1: {cut}");
    assert!(
        pids(&lab.ns("host1")).contains(&sleeper.id().to_string()),
        "an isolated host's processes stay alive"
    );
    lab.host_op("revive", 1);
    assert!(pings(&lab.ns("client"), "10.79.0.11"));
    assert!(pings(&lab.ns("host2"), "10.78.0.11"));

    // Killed: every process gone, links cut (the management link too); revived: links
    // up and an agent started again.
    lab.host_op("kill", 1);
    let mut sleeper = sleeper;
    let _ = sleeper.wait();
    assert!(
        pids(&lab.ns("host1")).is_empty(),
        "a killed host runs nothing"
    );
    assert!(!pings(&lab.ns("client"), "10.79.0.11"));
    let revived = tandem(&["lab", "revive", "--name", &name, "host1"]);
    assert_eq!(revived.code, 0, "{}{}", revived.stdout, revived.stderr);
    assert!(
        revived.stdout.contains("agent started"),
        "{}",
        revived.stdout
    );
    assert!(pings(&lab.ns("client"), "10.79.0.11"));

    // Unknown hosts are refused with the reason.
    let bad = tandem(&["lab", "isolate", "--name", &name, "host9"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("no host"), "{}", bad.stderr);

    // Down removes the namespaces, etcd, its data, the logs and the lab file; again is
    // fine.
    for _ in 0..2 {
        let down = tandem(&["lab", "down", "--name", &name]);
        assert_eq!(down.code, 0, "{}", down.stderr);
    }
    for f in [
        lab.lab_file(),
        format!("/tmp/{name}-etcd").into(),
        format!("/tmp/{name}-etcd.log").into(),
        lab.agent_log(1),
        lab.agent_log(2),
        format!("/tmp/{name}-shared").into(),
    ] {
        assert!(!f.exists(), "{} survived lab down", f.display());
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&format!("{name}-")),
        "namespaces survived lab down"
    );
}

#[test]
fn a_bare_lab_has_the_management_network_and_no_cluster() {
    let lab = Lab::up("lb", 1);
    assert!(!lab.lab_file().exists(), "a bare lab has no lab file");
    assert!(pings(&lab.ns("client"), "10.79.0.11"));
    assert!(pings(&lab.ns("host1"), "10.79.0.1"));
    let got = etcd(&lab.ns("client"), "/v3/kv/range", r#"{"key":"a2V5"}"#);
    assert!(got.is_empty(), "no etcd in a bare lab: {got}");
    assert!(pids(&lab.ns("net")).is_empty(), "nothing runs in NAME-net");
    // Reviving a host of a bare lab starts no agent.
    lab.host_op("isolate", 1);
    let r = tandem(&["lab", "revive", "--name", lab.name(), "host1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("agent"), "{}", r.stdout);
    assert!(pings(&lab.ns("client"), "10.79.0.11"));
}

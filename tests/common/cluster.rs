//! A lab cluster (etcd and an agent on every host) driven through the real `tandem` CLI, as
//! a user would: every verb is `tandem ARGS --lab NAME`.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Lab, Run, tandem};

pub struct Cluster {
    pub lab: Lab,
}

impl Cluster {
    /// A cluster of `hosts` hosts, once every agent registered and each reaches every other
    /// on the logging network (placement needs it; the agents probe it once they run).
    pub fn up(tag: &str, hosts: u32) -> Cluster {
        let c = Cluster {
            lab: Lab::cluster(tag, hosts),
        };
        c.wait("every agent registered and probed", 60, || {
            let r = c.verb(&["host", "list", "--json"]);
            r.code == 0
                && serde_json::from_str::<Vec<cluster::model::HostView>>(&r.stdout)
                    .is_ok_and(|h| cluster::model::meshed(&h, hosts as usize))
        });
        c
    }

    /// `tandem ARGS --lab NAME`.
    pub fn verb(&self, args: &[&str]) -> Run {
        let mut a = args.to_vec();
        a.extend(["--lab", &self.lab.name]);
        tandem(&a)
    }

    /// A verb that must succeed.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.verb(args);
        assert_eq!(
            r.code, 0,
            "tandem {args:?} failed:\n{}{}",
            r.stdout, r.stderr
        );
        r
    }

    /// A verb's `--json` answer.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.ok(&a);
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("tandem {args:?} --json: {e}: {}", r.stdout))
    }

    pub fn show(&self, vm: &str) -> Value {
        self.json(&["vm", "show", vm])
    }

    /// Wait (at most `secs`) until `ok` holds; how long it took.
    pub fn wait(&self, what: &str, secs: u64, mut ok: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "{what}: not within {secs} s; cluster: {}",
                self.verb(&["vm", "list"]).stdout
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        start.elapsed()
    }
}

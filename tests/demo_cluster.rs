//! The README's first command, `tandem demo`, end to end (a lab of 4 hosts running the
//! cluster, kvd under FT and an HA-restarted httpd, two host kills), and a short soak
//! (`tandem bench soak --kills 2`). Both must end PASS: nothing lost, no reset, every
//! failover re-protected. The two run one after the other (each is a whole cluster).

mod common;

use std::sync::Mutex;

use common::{guest, tandem};
use serde_json::Value;

/// One cluster at a time in this file.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes lab `name` down however the test ends (the demo does it too, unless it crashed).
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        tandem(&["lab", "down", "--name", &self.0]);
    }
}

fn lab_name(tag: &str) -> String {
    format!("t{}{tag}", std::process::id() % 100_000)
}

/// `key=value` of a verdict line, as a number.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|p| p.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn the_demo_tells_the_cluster_story_and_passes() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    guest("kvd.wasm");
    let name = lab_name("demo");
    let _down = Down(name.clone());
    let r = tandem(&["demo", "--name", &name]);
    let out = format!("{}{}", r.stdout, r.stderr);
    let last = r.last_line();
    assert!(
        last.starts_with("verdict: PASS failovers=2 reprotected=2 lost=0 resets=0 gap_ms="),
        "{out}"
    );
    assert_eq!(r.code, 0, "{out}");
    for key in ["gap_ms", "reprotect_s", "ha_restart_s"] {
        assert!(field(last, key) > 0.0, "{key}: {last}");
    }
    // The story as told: FT turned on, web HA-restarted, two automatic re-protections.
    assert!(r.stdout.contains("ft turn-on kvd: Protected"), "{out}");
    assert!(r.stdout.contains("web HA-restarted on host"), "{out}");
    assert_eq!(
        r.stdout.matches("kvd re-protected automatically").count(),
        2,
        "{out}"
    );
}

#[test]
fn a_short_soak_loses_nothing_and_reprotects_every_failover() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    guest("kvd.wasm");
    let name = lab_name("soak");
    let _down = Down(name.clone());
    let r = tandem(&["bench", "soak", "--kills", "2", "--json", "--name", &name]);
    let out = format!("{}{}", r.stdout, r.stderr);
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["pass"], true, "{v}");
    assert_eq!(v["failovers"], 2, "{v}");
    assert_eq!(v["reprotected"], 2, "{v}");
    assert_eq!(v["cluster_reprotections"], 2, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["resets"], 0, "{v}");
    assert!(v["acked"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert_eq!(r.code, 0, "{out}");
}

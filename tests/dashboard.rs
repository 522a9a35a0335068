//! The dashboard in a real browser (Debian's headless chromium, driven over chromium-driver's
//! WebDriver HTTP API) against a lab cluster of real agents on a real etcd: sign in, turn FT
//! on by clicking, see it Protected; kill the primary's host and see the failover in the
//! timeline and the VM Protected again without a reload; a destructive verb asks first.
//! Screenshots go to `target/screenshots/`.
//!
//! And `/metrics` scraped during load (redis-benchmark on an FT kvd): the counters move, and
//! the text parses as the Prometheus exposition format (a strict parser below).

mod common;

use common::cluster::Cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{KVD_LOAD, Lab, guest, s, tandem};
use serde_json::{Value, json};

const KVD_NIC: &str = "mac=02:00:00:00:00:10,ip=10.77.0.10/24";
/// chromedriver's port, inside the lab's client namespace.
const DRIVER_PORT: u16 = 9515;
/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn api_of(k: u32) -> String {
    format!("http://10.79.0.{}:7070", 10 + k)
}

impl Cluster {
    fn token(&self) -> String {
        std::fs::read_to_string(format!("/tmp/{}-shared/.token", self.lab.name))
            .unwrap()
            .trim()
            .to_string()
    }

    /// kvd created and powered on (FT off).
    fn kvd(&self, host: &str) {
        let kvd = guest("kvd.wasm");
        self.ok(&[
            "vm",
            "create",
            "kvd",
            "--wasm",
            s(&kvd),
            "--nic",
            KVD_NIC,
            "--listen",
            "tcp:6379",
            "--memory-mib",
            "64",
        ]);
        self.ok(&["vm", "power-on", "kvd", "--host", host]);
    }
}

/// A chromedriver (and the chromium it starts) in the lab's client namespace, and one
/// WebDriver session; all ended when dropped, also when the test fails.
struct Browser {
    ns: String,
    driver: Child,
    session: Option<String>,
    /// Chromium's profile: unique to this browser, it names its processes for the clean-up.
    profile: PathBuf,
    shots: PathBuf,
}

impl Browser {
    fn start(lab: &Lab) -> Browser {
        let ns = lab.ns("client");
        let profile = PathBuf::from(format!("/tmp/{}-chromium", lab.name));
        let _ = std::fs::remove_dir_all(&profile);
        // Chromium's scratch folders go inside the profile too, removed with it.
        std::fs::create_dir_all(profile.join("tmp")).unwrap();
        let driver = Command::new("ip")
            .args(["netns", "exec", &ns, "chromedriver"])
            .arg(format!("--port={DRIVER_PORT}"))
            .env("TMPDIR", profile.join("tmp"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/setup installs chromium-driver)");
        let shots = common::workspace().join("target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        let mut b = Browser {
            ns,
            driver,
            session: None,
            profile,
            shots,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.call("GET", "/status", None).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            std::thread::sleep(Duration::from_millis(200));
        }
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                // Prompts stay open until the test answers them.
                "unhandledPromptBehavior": "ignore",
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1440,1100",
                        format!("--user-data-dir={}", b.profile.join("data").display()),
                    ]
                }
            }}
        });
        let v = b.call("POST", "/session", Some(caps)).expect("a session");
        b.session = Some(v["sessionId"].as_str().expect("a session id").to_string());
        b
    }

    /// One WebDriver call (from inside the client namespace): its `value`, or its error.
    fn call(&self, method: &'static str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("http://127.0.0.1:{DRIVER_PORT}{path}");
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        let r = api::client::in_netns(&self.ns, move || {
            cluster::http::request(method, &url, body.as_deref(), Duration::from_secs(60))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("HTTP {}: {}", r.status, v["value"]));
        }
        Ok(v["value"].clone())
    }

    fn session(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let id = self.session.as_deref().expect("a session");
        self.call(method, &format!("/session/{id}{path}"), body)
    }

    fn go(&self, url: &str) {
        self.session("POST", "/url", Some(json!({ "url": url })))
            .unwrap();
    }

    fn find(&self, css: &str) -> Result<String, String> {
        let v = self.session(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        )?;
        Ok(v[ELEMENT]
            .as_str()
            .ok_or_else(|| format!("no element id in {v}"))?
            .to_string())
    }

    fn click(&self, css: &str) {
        let e = self.find(css).unwrap_or_else(|e| panic!("{css}: {e}"));
        self.session("POST", &format!("/element/{e}/click"), Some(json!({})))
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).unwrap_or_else(|e| panic!("{css}: {e}"));
        self.session(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .unwrap();
    }

    /// Run `script` (a function body) in the page.
    fn js(&self, script: &str) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    fn wait_js(&self, what: &str, secs: u64, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script);
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "{what}: not within {secs} s; page: {}",
                self.js("return document.querySelector('#vms') && document.querySelector('#vms').innerText")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn alert_text(&self) -> Result<String, String> {
        Ok(self
            .session("GET", "/alert/text", None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.session("GET", "/screenshot", None).unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot {}", path.display());
        path
    }

    /// Sign in at agent `api`'s dashboard with `token`; returns once the page is live.
    fn sign_in(&self, api: &str, token: &str) {
        self.go(&format!("{api}/"));
        self.wait_js(
            "the sign-in page",
            20,
            "return document.querySelector('#token') !== null",
        );
        let page = self.js("return document.body.innerText").to_string();
        assert!(
            page.contains(".token"),
            "the sign-in page says where the token is: {page}"
        );
        self.type_into("#token", token);
        self.click("#signin");
        self.wait_js(
            "the dashboard, live",
            30,
            "return document.querySelector('#live') && document.querySelector('#live').textContent === 'live' && document.querySelectorAll('#hosts tbody tr').length > 0",
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = self.session("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Any chromium left (its driver killed first): found by its unique profile.
        let needle = format!("--user-data-dir={}", self.profile.join("data").display());
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if cmd.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The VM row's FT status in the page.
const FT_OF_KVD: &str =
    "const e = document.querySelector('#vm-kvd [data-ft]'); return e ? e.dataset.ft : null;";

#[test]
fn the_dashboard_turns_ft_on_shows_a_failover_live_and_confirms_destructive_verbs() {
    let c = Cluster::up("dash", 3);
    let token = c.token();
    c.kvd("host2");
    c.wait("kvd running", 60, || {
        c.show("kvd")["primary_host"].as_str() == Some("host2")
    });
    let b = Browser::start(&c.lab);
    // Signed out: the page answers 401 with the sign-in form.
    b.sign_in(&api_of(1), &token);
    b.wait_js(
        "kvd in the table, FT off",
        30,
        "const e = document.querySelector('#vm-kvd [data-ft]'); return e && e.dataset.ft === 'off';",
    );
    b.screenshot("dashboard-signed-in");

    // Turn FT on by clicking (no confirmation: it is not destructive).
    b.click(r#"button[data-act="ft/turn-on"][data-vm="kvd"]"#);
    assert!(b.alert_text().is_err(), "turning FT on asks nothing");
    b.wait_js(
        "kvd Protected in the page",
        180,
        "const e = document.querySelector('#vm-kvd [data-ft]'); return e && e.dataset.ft === 'protected';",
    );
    let who = b.wait_js(
        "the verb in the timeline",
        10,
        "const e = [...document.querySelectorAll('#timeline li[data-kind=verb]')].find(l => l.textContent.includes('ft turn-on')); return e ? e.textContent : null;",
    );
    assert!(
        who.as_str().unwrap().contains("dashboard from 10.79.0.2"),
        "who asked: {who}"
    );
    let v = c.show("kvd");
    let primary = v["primary_host"].as_str().unwrap().to_string();
    let secondary = v["secondary_host"].as_str().unwrap().to_string();
    // Watch from the host that runs neither copy, so that the kill leaves the page's
    // agent up (a new page load, before the failover: the claim is about after it).
    let watcher = (1..=3)
        .find(|k| format!("host{k}") != primary && format!("host{k}") != secondary)
        .unwrap();
    if watcher != 1 {
        b.sign_in(&api_of(watcher), &token);
        b.wait_js(
            "kvd Protected on the watcher's page",
            30,
            "const e = document.querySelector('#vm-kvd [data-ft]'); return e && e.dataset.ft === 'protected';",
        );
    }
    b.wait_js(
        "lag shown green/yellow/red",
        30,
        "const e = document.querySelector('#vm-kvd [data-lag]'); return e ? e.dataset.lag : null;",
    );
    // The colours' thresholds (0.5 s and 1 s), and the seed's sizing formula next to the
    // logging bandwidth.
    assert_eq!(
        b.js("return [lagClass(0), lagClass(499), lagClass(500), lagClass(999), lagClass(1000)];"),
        json!(["green", "green", "yellow", "yellow", "red"])
    );
    let formula = b.js("return document.querySelector('#vm-kvd .formula').textContent;");
    assert!(
        formula.as_str().is_some_and(|f| f.contains("disk reads")
            && f.contains("× 8 + net in")
            && f.contains("× 1.2 =")),
        "{formula}"
    );
    // Some load, so that the bandwidth chart has something to show.
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    let load = c.lab.redis_benchmark(KVD_LOAD);
    assert_eq!(load.code, 0, "{}{}", load.stdout, load.stderr);
    std::thread::sleep(Duration::from_secs(2));
    b.screenshot("dashboard-protected");

    // Mark the page: a reload would lose the mark.
    b.js("window.tandemMark = 'no reload'; return true;");
    let kill = tandem(&["lab", "kill", &primary, "--name", &c.lab.name]);
    assert_eq!(kill.code, 0, "{}{}", kill.stdout, kill.stderr);
    let failover = b.wait_js(
        "the failover in the timeline",
        120,
        "const e = document.querySelector('#timeline li[data-kind=failover][data-vm=kvd]'); return e ? e.textContent : null;",
    );
    assert!(
        failover.as_str().unwrap().contains(&secondary),
        "the VM runs on the old secondary: {failover}"
    );
    b.wait_js(
        "kvd Protected again, its primary the old secondary",
        180,
        &format!(
            "const r = document.querySelector('#vm-kvd'); return r && r.querySelector('[data-ft]').dataset.ft === 'protected' && r.querySelector('.primary').textContent === '{secondary}';"
        ),
    );
    b.wait_js(
        "the re-protection in the timeline",
        30,
        "return document.querySelector('#timeline li[data-kind=reprotect][data-vm=kvd]') !== null;",
    );
    assert_eq!(
        b.js("return window.tandemMark || null;"),
        json!("no reload"),
        "the page was reloaded"
    );
    b.screenshot("dashboard-after-failover");
    // The counters behind it, from the watcher's /metrics.
    let kvd = [("vm", "kvd")];
    let start = Instant::now();
    loop {
        let m = scrape(&c, watcher);
        let failovers = value(&m, "tandem_vm_failovers_total", &kvd);
        let reprotections = value(&m, "tandem_vm_reprotections_total", &kvd);
        let took = value(&m, "tandem_vm_reprotect_duration_seconds", &kvd);
        if failovers == Some(1.0)
            && reprotections.is_some_and(|r| r >= 1.0)
            && took.is_some_and(|t| t > 0.0)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "metrics after the failover: failovers {failovers:?}, re-protections {reprotections:?}, re-protect duration {took:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A page opened now draws its charts from minutes back: the agent's samples come
    // with the stream's first event (a page's own would be one point).
    b.js("location.reload(); return true;");
    let points = b.wait_js(
        "the bandwidth chart drawn from the agent's history",
        10,
        "const c = document.querySelector('#bw'); return c && Number(c.dataset.points) >= 10 ? Number(c.dataset.points) : null;",
    );
    eprintln!("{points} samples in the chart right after a reload");

    // Host maintenance from the page: it asks first, and a refusal says why. Once the
    // killed host's lease is gone, only kvd's primary's host could take the secondary.
    c.wait("the killed host no longer registered", 60, || {
        !c.json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == primary.as_str() && h["state"] != "not responding")
    });
    let host = format!("host{watcher}");
    let enter = format!(r#"button[data-act="maintenance/enter"][data-host="{host}"]"#);
    b.wait_js(
        "the hosts' maintenance buttons",
        10,
        &format!("return document.querySelector('{enter}') !== null;"),
    );
    b.click(&enter);
    let question = b.alert_text().expect("a confirmation");
    assert!(
        question.contains(&format!("Enter maintenance on {host}")),
        "{question}"
    );
    b.session("POST", "/alert/dismiss", Some(json!({})))
        .unwrap();
    // Accepted: the rest of the cluster (one other live host, the primary's) cannot take
    // kvd's secondary, so it is refused, and the page says why.
    b.click(&enter);
    assert!(b.alert_text().unwrap().contains("Enter maintenance"));
    b.session("POST", "/alert/accept", Some(json!({}))).unwrap();
    let said = b.wait_js(
        "the refusal shown",
        20,
        "const t = document.querySelector('#toast'); return t && t.className === 'error' && t.textContent.includes('maintenance') ? t.textContent : null;",
    );
    assert!(
        said.as_str().unwrap().contains("cannot enter maintenance"),
        "{said}"
    );
    assert!(
        c.json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == host.as_str() && h["maintenance"] == false),
        "a refused maintenance leaves the host as it was"
    );

    // A destructive verb asks first: dismissed, nothing happens.
    b.click(r#"button[data-act="ft/turn-off"][data-vm="kvd"]"#);
    let question = b.alert_text().expect("a confirmation");
    assert!(question.contains("Turn Off FT on kvd"), "{question}");
    b.session("POST", "/alert/dismiss", Some(json!({})))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.show("kvd")["ft"],
        "protected",
        "a dismissed verb did nothing"
    );
    assert_eq!(b.js(FT_OF_KVD), json!("protected"));
    assert_eq!(
        b.js("return [...document.querySelectorAll('#timeline li[data-kind=verb]')].some(l => l.textContent.includes('ft turn-off'));"),
        json!(false)
    );
    // Accepted: done.
    b.click(r#"button[data-act="ft/turn-off"][data-vm="kvd"]"#);
    assert!(b.alert_text().unwrap().contains("Turn Off FT on kvd"));
    b.session("POST", "/alert/accept", Some(json!({}))).unwrap();
    b.wait_js(
        "kvd FT off in the page",
        60,
        "const e = document.querySelector('#vm-kvd [data-ft]'); return e && e.dataset.ft === 'off';",
    );
    assert_eq!(c.show("kvd")["ft"], "off");
    b.wait_js(
        "the accepted verb in the timeline",
        10,
        "return [...document.querySelectorAll('#timeline li[data-kind=verb]')].some(l => l.textContent.includes('ft turn-off'));",
    );
    b.screenshot("dashboard-ft-off");

    // A phone's width: the page still lays out (no horizontal overflow of the page itself).
    b.session(
        "POST",
        "/window/rect",
        Some(json!({ "width": 390, "height": 844 })),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let overflow =
        b.js("return document.documentElement.scrollWidth - document.documentElement.clientWidth;");
    assert!(
        overflow.as_i64().unwrap() <= 1,
        "the page overflows a phone's width by {overflow} px"
    );
    b.screenshot("dashboard-phone");
}

/// One sample of an exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_metric_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}")),
    }
}

/// `{k="v",...}` at the start of `s`: the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("no {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("a label without =")?;
        let name = &rest[..eq];
        if !valid_metric_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("an unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("a dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("a newline in a label value".into()),
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by ,".into());
        }
    }
}

/// A strict reader of the Prometheus text format 0.0.4: every sample's family declared by
/// `# TYPE` before it (once), families contiguous, no series twice, counters named
/// `_total`, every line ending in a newline.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    if !text.ends_with('\n') {
        return Err("the text does not end with a newline".into());
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps = BTreeSet::new();
    let mut finished = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if !valid_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            match kw {
                "HELP" => {
                    if !helps.insert(name.to_string()) {
                        return Err(at("HELP twice".into()));
                    }
                }
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        return Err(at(format!("bad type {t:?}")));
                    }
                    if types.insert(name.to_string(), t.to_string()).is_some() {
                        return Err(at("TYPE twice".into()));
                    }
                    if t == "counter" && !name.ends_with("_total") {
                        return Err(at("a counter not named _total".into()));
                    }
                }
                _ => return Err(at("a comment that is neither HELP nor TYPE".into())),
            }
            if let Some(c) = current.take().filter(|c| c != name) {
                finished.insert(c);
            }
            continue;
        }
        if line.trim().is_empty() || line.starts_with('#') {
            return Err(at("an empty or malformed line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?
            .split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| at(format!("timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        if !types.contains_key(name) {
            return Err(at("a sample before its TYPE".into()));
        }
        if finished.contains(name) {
            return Err(at("a family's samples not together".into()));
        }
        if current.as_deref() != Some(name)
            && let Some(c) = current.replace(name.to_string())
        {
            finished.insert(c);
        }
        if !series.insert((name.to_string(), format!("{labels:?}"))) {
            return Err(at("a series twice".into()));
        }
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

#[test]
fn the_strict_parser_refuses_what_is_not_the_exposition_format() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{vm=\"k\\\"v\"} 3\na_total{vm=\"x\"} 4 1700000000000\n# TYPE b gauge\nb NaN\n";
    let s = parse_exposition(good).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s[0].labels["vm"], "k\"v");
    for bad in [
        "a 1\n",                                           // no TYPE
        "# TYPE a counter\na 1\n",                         // counter without _total
        "# TYPE a gauge\na 1",                             // no final newline
        "# TYPE a gauge\na{x=\"1\" 1\n",                   // unterminated labels
        "# TYPE a gauge\na{x=1} 1\n",                      // unquoted
        "# TYPE a gauge\na one\n",                         // not a number
        "# TYPE a gauge\na 1\na 2\n",                      // a series twice
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na 2\n", // not contiguous... (a after b)
        "# TYPE a gauge\n# note\na 1\n",                   // stray comment
        "# TYPE a gauge\na{x=\"\\q\"} 1\n",                // bad escape
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}

/// `/metrics` of agent K, scraped from the client machine (no token).
fn scrape(c: &Cluster, k: u32) -> Vec<Sample> {
    let r = c.lab.client(
        "curl",
        &["-sf", "-m", "5", &format!("{}/metrics", api_of(k))],
    );
    assert_eq!(r.code, 0, "scrape host{k}: {}", r.stderr);
    parse_exposition(&r.stdout).unwrap_or_else(|e| panic!("host{k}'s /metrics: {e}\n{}", r.stdout))
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

#[test]
fn metrics_scraped_during_load_parse_strictly_and_their_counters_move() {
    let c = Cluster::up("metrics", 2);
    // `cluster status` says where the dashboard and the token are: the dashboard at an
    // address of this machine (the lab's relay), which answers from here, outside the lab.
    let st = c.ok(&["cluster", "status"]);
    let url = st
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("dashboard: "))
        .unwrap_or_else(|| panic!("no dashboard line: {}", st.stdout))
        .trim()
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let health = std::process::Command::new("curl")
        .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{url}healthz"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&health.stdout),
        "200",
        "{url}healthz"
    );
    let page = std::process::Command::new("curl")
        .args(["-s", "-m", "5"])
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&page.stdout).contains(".token"),
        "the dashboard asks for the token from here"
    );
    assert!(
        st.stdout
            .contains(&format!("token:    /tmp/{}-shared/.token", c.lab.name)),
        "{}",
        st.stdout
    );
    c.kvd("host1");
    c.ok(&["ft", "turn-on", "kvd"]);
    c.wait("kvd protected", 180, || c.show("kvd")["ft"] == "protected");
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    let kvd = [("vm", "kvd")];
    let before = scrape(&c, 2);
    assert_eq!(
        value(
            &before,
            "tandem_vm_ft_state",
            &[("vm", "kvd"), ("state", "protected")]
        ),
        Some(1.0)
    );
    let events0 = value(&before, "tandem_vm_events_total", &kvd).expect("events");
    let bytes0 = value(&before, "tandem_vm_log_bytes_total", &kvd).expect("log bytes");
    let held0 = value(&before, "tandem_vm_outputs_held_total", &kvd).expect("outputs held");
    // Load, scraping while it runs: every scrape parses.
    let load = std::thread::scope(|s| {
        let bench = s.spawn(|| c.lab.redis_benchmark(KVD_LOAD));
        let mut scrapes = 0;
        while !bench.is_finished() {
            scrape(&c, 1 + scrapes % 2);
            scrapes += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("{scrapes} scrapes during the load");
        assert!(scrapes >= 1, "no scrape while the load ran");
        bench.join().unwrap()
    });
    assert_eq!(load.code, 0, "{}{}", load.stdout, load.stderr);
    // The counters moved (the agents report every second or so: wait for it).
    let start = Instant::now();
    let after = loop {
        let a = scrape(&c, 2);
        let moved = value(&a, "tandem_vm_events_total", &kvd).unwrap_or(0.0) > events0
            && value(&a, "tandem_vm_log_bytes_total", &kvd).unwrap_or(0.0) > bytes0
            && value(&a, "tandem_vm_outputs_held_total", &kvd).unwrap_or(0.0) > held0;
        if moved {
            break a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the counters did not move: before events {events0} bytes {bytes0} held {held0}, now {:?} {:?} {:?}",
            value(&a, "tandem_vm_events_total", &kvd),
            value(&a, "tandem_vm_log_bytes_total", &kvd),
            value(&a, "tandem_vm_outputs_held_total", &kvd)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "events {events0} -> {:?}, log bytes {bytes0} -> {:?}, outputs held {held0} -> {:?}",
        value(&after, "tandem_vm_events_total", &kvd),
        value(&after, "tandem_vm_log_bytes_total", &kvd),
        value(&after, "tandem_vm_outputs_held_total", &kvd)
    );
    // Lag is in seconds, and small on an idle protected VM.
    let lag = value(&after, "tandem_vm_secondary_lag_seconds", &kvd).expect("lag");
    assert!((0.0..60.0).contains(&lag), "lag {lag} s");
    // Exactly one agent says it is the master; each host counts kvd's FT copy.
    let (m1, m2) = (scrape(&c, 1), scrape(&c, 2));
    let masters: f64 = [(&m1, "host1"), (&m2, "host2")]
        .iter()
        .map(|(s, h)| value(s, "tandem_agent_master", &[("host", h)]).unwrap())
        .sum();
    assert_eq!(masters, 1.0);
    for h in ["host1", "host2"] {
        assert_eq!(
            value(&m1, "tandem_host_ft_vms", &[("host", h)]),
            Some(1.0),
            "{h}"
        );
    }
    assert_eq!(value(&m1, "tandem_store_up", &[]), Some(1.0));

    // `lab dashboard` relays this machine's port to the lab's agents.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    struct Relay(std::process::Child);
    impl Drop for Relay {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _relay = Relay(
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "lab",
                "dashboard",
                "--name",
                &c.lab.name,
                "--listen",
                &listen,
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = |p: &str| format!("http://{listen}{p}");
    let get = |p: &str, headers: &[(&str, &str)]| {
        cluster::http::request_with("GET", &url(p), headers, None, Duration::from_secs(5))
    };
    let start = Instant::now();
    while get("/healthz", &[]).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lab dashboard never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let page = get("/", &[]).unwrap();
    assert_eq!(page.status, 401);
    assert!(page.text().contains("<form"), "the sign-in page");
    let bearer = format!("Bearer {}", c.token());
    let vms = get("/api/v1/vms", &[("Authorization", &bearer)]).unwrap();
    assert_eq!(vms.status, 200);
    assert!(vms.text().contains("\"kvd\""), "{}", vms.text());
}

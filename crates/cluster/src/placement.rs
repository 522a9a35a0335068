//! Placement: which host takes a copy of a VM. Pure functions of the cluster's state, so
//! that the master's decisions and the verbs' requirement checks are the same rules.
//!
//! Rules (DESIGN.md, "The cluster"): a host in maintenance takes nothing; a host takes a
//! copy only if the memory of every copy placed on it, this one included, fits; at most
//! [`MAX_FT_COPIES_PER_HOST`] FT copies (primaries and secondaries of FT VMs together) per
//! host; a secondary never shares its primary's host and needs a host with the same Tandem
//! version and engine fingerprint, and one that reaches the primary's host on the logging
//! network (as its agent last probed); among the hosts that qualify, the least loaded wins
//! (fewest FT copies, then fewest copies, then least memory reserved, then name), which
//! spreads load.

use std::collections::BTreeMap;

use crate::model::{FtMode, HostRecord, MAX_FT_COPIES_PER_HOST, Placement, VmRecord};

/// A host and what is already placed on it.
#[derive(Clone, Debug)]
pub struct HostLoad {
    pub host: HostRecord,
    pub ft_copies: usize,
    pub copies: usize,
    pub reserved_mib: u64,
}

/// What every host carries, from the placements of every VM.
pub fn loads(
    hosts: &[HostRecord],
    vms: &BTreeMap<String, VmRecord>,
    places: &BTreeMap<String, Placement>,
) -> Vec<HostLoad> {
    let mut out: Vec<HostLoad> = hosts
        .iter()
        .map(|h| HostLoad {
            host: h.clone(),
            ft_copies: 0,
            copies: 0,
            reserved_mib: 0,
        })
        .collect();
    for (name, p) in places {
        let Some(vm) = vms.get(name) else { continue };
        // A scheduled VM counts as FT while its schedule has FT on.
        let ft = crate::ops::effective(vm).ft != FtMode::Off;
        let copies = [p.primary.as_ref(), p.secondary.as_ref()];
        for c in copies.into_iter().flatten() {
            if let Some(l) = out.iter_mut().find(|l| l.host.name == c.host) {
                l.copies += 1;
                l.ft_copies += usize::from(ft);
                l.reserved_mib += vm.spec.memory_mib;
            }
        }
        // A parked secondary keeps its host's reservation: enabling FT again must fit.
        if let Some(h) = &p.secondary_parked
            && let Some(l) = out.iter_mut().find(|l| &l.host.name == h)
        {
            l.ft_copies += 1;
            l.reserved_mib += vm.spec.memory_mib;
        }
    }
    out
}

/// What is being placed.
pub struct Request<'a> {
    pub vm: &'a VmRecord,
    /// The copy is part of an FT pair (counts against the per-host FT limit).
    pub ft: bool,
    /// For a secondary: its primary's host (excluded; version and fingerprint must match).
    pub primary: Option<&'a HostRecord>,
    /// Prefer this host when it qualifies (`power-on --host`, a parked secondary,
    /// `migrate-secondary --to`).
    pub prefer: Option<&'a str>,
    /// Hosts not to use (a host the copy just failed on).
    pub avoid: &'a [String],
    /// Memory already counted on a host for this copy (moving a parked reservation).
    pub counted_on: Option<&'a str>,
    /// A copy placed only to move the VM (it goes live there and the pair it joins ends):
    /// it may run another Tandem version than the primary's host, as long as the engine
    /// fingerprint is the same (a rolling upgrade moves VMs across versions this way).
    pub any_version: bool,
}

impl<'a> Request<'a> {
    /// A secondary for a primary on `primary`: nothing preferred, nothing counted already.
    pub fn secondary(
        vm: &'a VmRecord,
        primary: &'a HostRecord,
        any_version: bool,
        avoid: &'a [String],
    ) -> Self {
        Request {
            vm,
            ft: true,
            primary: Some(primary),
            prefer: None,
            avoid,
            counted_on: None,
            any_version,
        }
    }
}

/// Why a host cannot take the copy, or `None` if it can.
fn unfit(load: &HostLoad, req: &Request) -> Option<String> {
    let h = &load.host;
    if let Some(p) = req.primary {
        if p.name == h.name {
            return Some(format!("{} runs the primary", h.name));
        }
        if p.version != h.version && !req.any_version {
            return Some(format!(
                "{} runs Tandem {} but the primary's host {} runs {}",
                h.name, h.version, p.name, p.version
            ));
        }
        if p.fingerprint != h.fingerprint {
            return Some(format!(
                "{} has engine fingerprint {} but the primary's host {} has {}",
                h.name, h.fingerprint, p.name, p.fingerprint
            ));
        }
        // A host whose last probe came before the primary's host registered did not miss
        // it: like a host not yet probed, it may take the copy. (An agent that does not
        // say what it missed: any host it did not reach.)
        let cut_off = match &h.log_missed {
            Some(missed) => missed.contains(&p.name),
            None => h
                .log_peers
                .as_ref()
                .is_some_and(|reached| !reached.contains(&p.name)),
        };
        if cut_off {
            return Some(format!(
                "{} cannot reach the primary's host {} on the logging network ({})",
                h.name, p.name, p.log_ip
            ));
        }
    }
    if h.maintenance {
        return Some(format!("{} is in maintenance", h.name));
    }
    if req.avoid.contains(&h.name) {
        return Some(format!("{} just failed this VM", h.name));
    }
    let counted = req.counted_on == Some(h.name.as_str());
    let ft_after = load.ft_copies + usize::from(req.ft && !counted);
    if req.ft && ft_after > MAX_FT_COPIES_PER_HOST {
        return Some(format!(
            "{} is full ({} FT copies, at most {MAX_FT_COPIES_PER_HOST})",
            h.name, load.ft_copies
        ));
    }
    let mem = req.vm.spec.memory_mib;
    let after = load.reserved_mib + if counted { 0 } else { mem };
    if after > h.memory_mib {
        return Some(format!(
            "{} has {} MiB of {} MiB free, the VM needs {mem} MiB",
            h.name,
            h.memory_mib.saturating_sub(load.reserved_mib),
            h.memory_mib
        ));
    }
    None
}

/// Where an FT pair one of whose hosts leaves (maintenance) goes next.
#[derive(Debug, PartialEq, Eq)]
pub enum PairPlan {
    /// The copy it needs fits among hosts of its own version, on this host: after the
    /// switch, a secondary for the secondary's host; else a secondary elsewhere.
    Within(String),
    /// None of its version can: the VM moves to `to`, a host of Tandem `version` (same
    /// engine) where a host of that version can then re-protect it.
    Across { to: String, version: String },
}

/// The one rule the master follows and `enter_maintenance` checks beforehand. `place`
/// places one FT copy for a primary on the given host (`any_version`, `avoid`), counting
/// it where the caller keeps count. `primary_leaves`: the primary's host is the one
/// leaving (else the secondary's). The error is why the needed copy fits nowhere.
pub fn plan_pair(
    hosts: &BTreeMap<String, HostRecord>,
    primary: &HostRecord,
    secondary: &HostRecord,
    primary_leaves: bool,
    mut place: impl FnMut(&HostRecord, bool, &[String]) -> Result<String, String>,
) -> Result<PairPlan, String> {
    let needed = if primary_leaves {
        place(secondary, false, &[])
    } else {
        place(primary, false, std::slice::from_ref(&secondary.name))
    };
    let why = match needed {
        Ok(host) => return Ok(PairPlan::Within(host)),
        Err(why) => why,
    };
    let across = place(primary, true, std::slice::from_ref(&secondary.name))
        .ok()
        .and_then(|to| hosts.get(&to))
        .filter(|th| th.version != primary.version)
        .filter(|th| place(th, false, &[]).is_ok());
    match across {
        Some(th) => Ok(PairPlan::Across {
            to: th.name.clone(),
            version: th.version.clone(),
        }),
        None => Err(why),
    }
}

/// The host for the copy, or one line saying why no host can take it.
pub fn place(loads: &[HostLoad], req: &Request) -> Result<String, String> {
    let what = if req.primary.is_some() {
        "secondary"
    } else {
        "VM"
    };
    if let Some(want) = req.prefer
        && let Some(l) = loads.iter().find(|l| l.host.name == want)
        && unfit(l, req).is_none()
    {
        return Ok(want.to_string());
    }
    let mut fit: Vec<&HostLoad> = loads.iter().filter(|l| unfit(l, req).is_none()).collect();
    fit.sort_by(|a, b| {
        (a.ft_copies, a.copies, a.reserved_mib, &a.host.name).cmp(&(
            b.ft_copies,
            b.copies,
            b.reserved_mib,
            &b.host.name,
        ))
    });
    if let Some(best) = fit.first() {
        return Ok(best.host.name.clone());
    }
    let others: Vec<&HostLoad> = loads
        .iter()
        .filter(|l| req.primary.is_none_or(|p| p.name != l.host.name))
        .collect();
    if others.is_empty() {
        return Err(match req.primary {
            Some(p) => format!(
                "no compatible second host: the cluster has no host but the primary's ({})",
                p.name
            ),
            None => "no host: no host agent is connected".into(),
        });
    }
    let why: Vec<String> = others.iter().filter_map(|l| unfit(l, req)).collect();
    let all_full = others
        .iter()
        .all(|l| unfit(l, req).is_some_and(|w| w.contains("is full") || w.contains("MiB free")));
    let head = if all_full {
        "every host is full".to_string()
    } else if req.primary.is_some() {
        "no compatible second host".to_string()
    } else {
        format!("no host can take the {what}")
    };
    Err(format!("{head}: {}", why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Copy;

    fn host(name: &str) -> HostRecord {
        HostRecord {
            version: "1.0".into(),
            ..crate::model::fixtures::host(name)
        }
    }

    fn vm(name: &str, ft: FtMode) -> VmRecord {
        crate::model::fixtures::vm(name, ft, 256)
    }

    fn req<'a>(v: &'a VmRecord, primary: Option<&'a HostRecord>) -> Request<'a> {
        Request {
            vm: v,
            ft: true,
            primary,
            prefer: None,
            avoid: &[],
            counted_on: None,
            any_version: false,
        }
    }

    #[test]
    fn a_secondary_never_shares_its_primarys_host() {
        let hosts = vec![host("h1"), host("h2")];
        let l = loads(&hosts, &BTreeMap::new(), &BTreeMap::new());
        let v = vm("kvd", FtMode::On);
        assert_eq!(place(&l, &req(&v, Some(&hosts[0]))).unwrap(), "h2");
        assert_eq!(place(&l, &req(&v, Some(&hosts[1]))).unwrap(), "h1");
        let one = loads(&hosts[..1], &BTreeMap::new(), &BTreeMap::new());
        let e = place(&one, &req(&v, Some(&hosts[0]))).unwrap_err();
        assert!(e.starts_with("no compatible second host"), "{e}");
    }

    #[test]
    fn at_most_four_ft_copies_per_host_and_the_least_loaded_wins() {
        let hosts = vec![host("h1"), host("h2"), host("h3")];
        let mut vms = BTreeMap::new();
        let mut places = BTreeMap::new();
        for i in 0..4 {
            let n = format!("v{i}");
            vms.insert(n.clone(), vm(&n, FtMode::On));
            places.insert(
                n,
                Placement {
                    primary: Some(Copy {
                        id: 1,
                        host: "h1".into(),
                        incarnation: 0,
                    }),
                    secondary: Some(Copy {
                        id: 2,
                        host: if i < 2 { "h2" } else { "h3" }.into(),
                        incarnation: 0,
                    }),
                    ..Default::default()
                },
            );
        }
        let l = loads(&hosts, &vms, &places);
        let v = vm("new", FtMode::On);
        // h1 is full: a fifth FT primary goes elsewhere, to the least loaded.
        let got = place(&l, &req(&v, None)).unwrap();
        assert_ne!(got, "h1");
        // A secondary for a primary on h2 cannot go to h1 (full) nor h2 (primary): h3.
        assert_eq!(place(&l, &req(&v, Some(&hosts[1]))).unwrap(), "h3");
        // A non-FT VM does not count against the FT limit.
        let plain = vm("plain", FtMode::Off);
        let mut r = req(&plain, None);
        r.ft = false;
        r.prefer = Some("h1");
        assert_eq!(place(&l, &r).unwrap(), "h1");
        // With only h1 (full) and h2 (primary), the refusal says every host is full.
        let two = loads(&hosts[..1], &vms, &places);
        let e = place(&two, &req(&v, None)).unwrap_err();
        assert!(e.starts_with("every host is full"), "{e}");
    }

    #[test]
    fn a_version_or_fingerprint_mismatch_is_refused_with_its_reason() {
        let mut other = host("h2");
        other.version = "2.0".into();
        let hosts = vec![host("h1"), other];
        let l = loads(&hosts, &BTreeMap::new(), &BTreeMap::new());
        let v = vm("kvd", FtMode::On);
        let e = place(&l, &req(&v, Some(&hosts[0]))).unwrap_err();
        assert!(e.contains("runs Tandem 2.0"), "{e}");
        let mut third = host("h3");
        third.fingerprint = "g".into();
        let l = loads(&[host("h1"), third], &BTreeMap::new(), &BTreeMap::new());
        let e = place(&l, &req(&v, Some(&hosts[0]))).unwrap_err();
        assert!(e.contains("engine fingerprint g"), "{e}");
    }

    #[test]
    fn a_host_that_cannot_reach_the_primary_on_the_logging_network_is_refused() {
        let mut cut = host("h2");
        cut.log_peers = Some(vec!["h3".into()]);
        let mut p = host("h1");
        p.log_ip = "10.78.0.11".into();
        let hosts = vec![p, cut];
        let l = loads(&hosts, &BTreeMap::new(), &BTreeMap::new());
        let v = vm("kvd", FtMode::On);
        let e = place(&l, &req(&v, Some(&hosts[0]))).unwrap_err();
        assert!(
            e.contains("h2 cannot reach the primary's host h1 on the logging network (10.78.0.11)"),
            "{e}"
        );
        let mut ok = host("h2");
        ok.log_peers = Some(vec!["h1".into()]);
        let l = loads(&[hosts[0].clone(), ok], &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(place(&l, &req(&v, Some(&hosts[0]))).unwrap(), "h2");
        // Its last probe tried h1 and missed it: cut off.
        let mut missed = host("h2");
        missed.log_peers = Some(vec!["h3".into()]);
        missed.log_missed = Some(vec!["h1".into()]);
        let l = loads(
            &[hosts[0].clone(), missed],
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        let e = place(&l, &req(&v, Some(&hosts[0]))).unwrap_err();
        assert!(e.contains("h2 cannot reach the primary's host h1"), "{e}");
        // Its last probe came before h1 registered: not known to be cut off, like a host
        // not yet probed.
        let mut early = host("h2");
        early.log_peers = Some(vec!["h3".into()]);
        early.log_missed = Some(Vec::new());
        let l = loads(
            &[hosts[0].clone(), early],
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(place(&l, &req(&v, Some(&hosts[0]))).unwrap(), "h2");
    }

    #[test]
    fn maintenance_and_memory_exclude_hosts() {
        let mut m = host("h2");
        m.maintenance = true;
        let mut small = host("h3");
        small.memory_mib = 100;
        let hosts = vec![host("h1"), m, small];
        let l = loads(&hosts, &BTreeMap::new(), &BTreeMap::new());
        let v = vm("kvd", FtMode::On);
        let e = place(&l, &req(&v, Some(&hosts[0]))).unwrap_err();
        assert!(e.contains("h2 is in maintenance"), "{e}");
        assert!(e.contains("h3 has 100 MiB of 100 MiB free"), "{e}");
    }
}

//! The cluster's event timeline: failovers, re-protections, HA restarts, arbitration
//! results and the verbs users asked (and who asked), kept in the store for the dashboard.
//!
//! Keys: `timeline/<unix ms, zero-padded to 16 digits>-<host>-<seq>` → [`TimelineEvent`]
//! (JSON). The zero padding makes the store's key order the time order.
//!
//! Invariants:
//! - bounded: at most [`MAX_EVENTS`] are kept (each write prunes the oldest beyond that),
//!   each field clipped to [`MAX_FIELD`] characters;
//! - best effort: a timeline write that fails is logged, never fails the decision or the
//!   verb it describes (the placement or the record written is the truth, this its story);
//! - one writer per event: the master writes what it decides (placement changes), the agent
//!   serving a verb writes that verb.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::model::{self, Placement};
use crate::store::{Store, StoreError};

/// Events kept in the store.
pub const MAX_EVENTS: usize = 500;
/// The longest field (characters) of an event.
pub const MAX_FIELD: usize = 300;

/// What happened.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The secondary took over: the VM runs on the old secondary's host.
    Failover,
    /// A secondary caught up again after the VM lost protection.
    Reprotect,
    /// A VM lost with no secondary was started again from its datastore.
    HaRestart,
    /// Who won the go-live race between a primary and its secondary.
    Arbitration,
    /// A user's verb, as the API carried it.
    Verb,
    /// Any other decision worth seeing (a VM left off, a copy that cannot be placed).
    Notice,
    /// The copies moved the VM by themselves, no copy having failed: the primary's host lost
    /// a path (storage, VM network) the secondary's host has. Not a failover.
    Handover,
}

/// One event of the timeline (`GET /api/v1/timeline`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct TimelineEvent {
    /// When (Unix ms).
    pub at_ms: u64,
    pub kind: EventKind,
    /// The VM it concerns, if any.
    #[serde(default)]
    pub vm: Option<String>,
    /// The host it concerns (where the VM now runs, or the agent that served the verb).
    #[serde(default)]
    pub host: Option<String>,
    /// What happened, one line.
    pub detail: String,
    /// Who asked (verbs): how the caller signed in, and from which address.
    #[serde(default)]
    pub who: Option<String>,
}

fn prefix() -> String {
    format!("{}timeline/", model::PREFIX)
}

fn clip(s: &str) -> String {
    let one_line = s.replace(['\r', '\n'], " ");
    one_line.chars().take(MAX_FIELD).collect()
}

/// Record one event (fields clipped) and prune the timeline to [`MAX_EVENTS`].
pub fn record(store: &Store, mut event: TimelineEvent) -> Result<(), StoreError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    event.detail = clip(&event.detail);
    event.vm = event.vm.as_deref().map(clip);
    event.host = event.host.as_deref().map(clip);
    event.who = event.who.as_deref().map(clip);
    let writer: String = event
        .host
        .as_deref()
        .unwrap_or("-")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(model::MAX_NAME)
        .collect();
    let key = format!(
        "{}{:016}-{writer}-{}",
        prefix(),
        event.at_ms,
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let bytes = serde_json::to_vec(&event).map_err(|e| StoreError::Decode(e.to_string()))?;
    store.put(&key, &bytes, None)?;
    let all = store.get_prefix(&prefix())?;
    if all.len() > MAX_EVENTS {
        // Keys sort by time: the first ones are the oldest.
        for kv in &all[..all.len() - MAX_EVENTS] {
            store.delete(&kv.key)?;
        }
    }
    Ok(())
}

/// [`record`], logging instead of failing (see the invariants).
pub fn note(store: &Store, event: TimelineEvent) {
    if let Err(e) = record(store, event) {
        tracing::warn!("timeline: cannot record an event: {e}");
    }
}

/// The last `limit` events, oldest first (undecodable entries skipped).
pub fn recent(store: &Store, limit: usize) -> Result<Vec<TimelineEvent>, StoreError> {
    let all = store.get_prefix(&prefix())?;
    let skip = all.len().saturating_sub(limit);
    Ok(all[skip..]
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// How a copy that halted exits (`tandem ft`'s exit 4: it lost arbitration, or could not
/// go live without what clients were told).
pub const LOST_ARBITRATION_EXIT: &str = "exit 4";

/// The events a placement change tells (the master calls this once a placement it
/// decided is written): one per counter that moved, a secondary replaced, and a VM newly
/// left off. `old_secondary_exit` is how the replaced secondary's process ended, if known.
pub fn events_of_change(
    vm: &str,
    old: &Placement,
    new: &Placement,
    old_secondary_exit: Option<&str>,
) -> Vec<TimelineEvent> {
    let now = model::now_ms();
    let event = |kind, host: Option<&str>, detail: String| TimelineEvent {
        at_ms: now,
        kind,
        vm: Some(vm.to_string()),
        host: host.map(str::to_string),
        detail,
        who: None,
    };
    let mut out = Vec::new();
    let primary = new.primary.as_ref().map(|c| c.host.as_str());
    if new.failovers > old.failovers {
        let was = old.primary.as_ref().map_or("?", |c| c.host.as_str());
        let now_on = primary.unwrap_or("?");
        out.push(event(
            EventKind::Arbitration,
            primary,
            format!("the secondary on {now_on} won arbitration; the primary on {was} is fenced"),
        ));
        out.push(event(
            EventKind::Failover,
            primary,
            format!("failover: the VM runs on {now_on} (its primary on {was} was lost)"),
        ));
    }
    if new.handovers > old.handovers {
        let was = old.primary.as_ref().map_or("?", |c| c.host.as_str());
        let why = new.last_handover.as_deref().unwrap_or("?");
        out.push(event(
            EventKind::Handover,
            primary,
            format!(
                "handover ({}): the VM runs on {}, its primary on {was} {}",
                why.split_once(" (").map_or(why, |(cause, _)| cause),
                primary.unwrap_or("?"),
                why.strip_prefix("primary ").unwrap_or(why)
            ),
        ));
    }
    if new.restarts > old.restarts {
        let was = old.primary.as_ref().map_or("?", |c| c.host.as_str());
        out.push(event(
            EventKind::HaRestart,
            primary,
            format!(
                "HA restart from the datastore (lost on {was}){}",
                primary.map_or(String::new(), |h| format!(", on {h}"))
            ),
        ));
    }
    if new.reprotections > old.reprotections {
        let secondary = new.secondary.as_ref().map_or("?", |c| c.host.as_str());
        out.push(event(
            EventKind::Reprotect,
            primary,
            format!(
                "protected again after {:.1} s (secondary on {secondary})",
                new.last_reprotect_ms.unwrap_or(0) as f64 / 1000.0
            ),
        ));
    }
    // A secondary replaced without a failover (lost, restarted, migrated).
    if new.failovers == old.failovers
        && let (Some(was), Some(now_s)) = (old.secondary.as_ref(), new.secondary.as_ref())
        && was.id != now_s.id
    {
        if old_secondary_exit == Some(LOST_ARBITRATION_EXIT) {
            out.push(event(
                EventKind::Arbitration,
                primary,
                format!(
                    "the primary on {} stays live: the secondary on {} halted (it lost \
                     arbitration, or could not go live)",
                    primary.unwrap_or("?"),
                    was.host
                ),
            ));
        }
        out.push(event(
            EventKind::Notice,
            primary,
            format!(
                "a new secondary on {} (the one on {} was lost or replaced)",
                now_s.host, was.host
            ),
        ));
    }
    if let Some((_, why)) = new.ended.as_ref().filter(|_| old.ended.is_none()) {
        out.push(event(
            EventKind::Notice,
            primary,
            format!("left off: {why}"),
        ));
    }
    out
}

/// Record what a placement change tells (see [`events_of_change`]), the copies' reports
/// read from the master's `view`.
pub fn placement_changed(
    store: &Store,
    view: &crate::master::View,
    vm: &str,
    old: &Placement,
    new: &Placement,
) {
    let exit = old
        .secondary
        .as_ref()
        .and_then(|c| view.report(vm, c))
        .and_then(|r| r.exit.clone());
    for e in events_of_change(vm, old, new, exit.as_deref()) {
        note(store, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Copy;

    fn copy(id: u64, host: &str) -> Option<Copy> {
        Some(Copy {
            id,
            host: host.into(),
            incarnation: 0,
        })
    }

    #[test]
    fn a_failover_tells_arbitration_and_failover_and_a_reprotection_its_duration() {
        let old = Placement {
            primary: copy(1, "host1"),
            secondary: copy(2, "host2"),
            ..Default::default()
        };
        let mut new = Placement {
            primary: copy(2, "host2"),
            failovers: 1,
            ..Default::default()
        };
        let e = events_of_change("kvd", &old, &new, None);
        let kinds: Vec<EventKind> = e.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Arbitration, EventKind::Failover]);
        assert!(e[1].detail.contains("host2") && e[1].detail.contains("host1"));
        let old = new.clone();
        new.secondary = copy(3, "host3");
        new.reprotections = 1;
        new.last_reprotect_ms = Some(2500);
        let e = events_of_change("kvd", &old, &new, None);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].kind, EventKind::Reprotect);
        assert!(e[0].detail.contains("2.5 s"), "{}", e[0].detail);
        // Nothing moved: nothing told.
        assert!(events_of_change("kvd", &new, &new, None).is_empty());
    }

    #[test]
    fn a_handover_is_told_as_one_with_its_cause_never_as_a_failover() {
        let old = Placement {
            primary: copy(1, "host1"),
            secondary: copy(2, "host2"),
            ..Default::default()
        };
        let new = Placement {
            primary: copy(2, "host2"),
            handovers: 1,
            last_handover: Some("primary lost its VM network (uplink has no carrier)".into()),
            ..Default::default()
        };
        let e = events_of_change("kvd", &old, &new, None);
        let kinds: Vec<EventKind> = e.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Handover]);
        assert!(
            e[0].detail.starts_with(
                "handover (primary lost its VM network): the VM runs on host2, its primary on \
                 host1 lost its VM network (uplink has no carrier)"
            ),
            "{}",
            e[0].detail
        );
    }

    #[test]
    fn a_replaced_secondary_is_a_notice() {
        let old = Placement {
            primary: copy(1, "host1"),
            secondary: copy(2, "host2"),
            ..Default::default()
        };
        let new = Placement {
            secondary: copy(3, "host3"),
            ..old.clone()
        };
        let e = events_of_change("kvd", &old, &new, Some("exit 0"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].kind, EventKind::Notice);
        assert!(e[0].detail.contains("host3") && e[0].detail.contains("host2"));
        // A secondary that halted having lost arbitration: the primary won.
        let e = events_of_change("kvd", &old, &new, Some(LOST_ARBITRATION_EXIT));
        assert_eq!(e[0].kind, EventKind::Arbitration);
        assert!(
            e[0].detail.contains("primary on host1 stays live"),
            "{}",
            e[0].detail
        );
    }

    #[test]
    fn the_timeline_in_etcd_keeps_the_last_events_in_order() {
        let etcd = crate::store::tests::Etcd::start();
        let store = etcd.store();
        let at = model::now_ms();
        for i in 0..(MAX_EVENTS + 5) {
            record(
                &store,
                TimelineEvent {
                    at_ms: at + i as u64,
                    kind: EventKind::Verb,
                    vm: Some("kvd".into()),
                    host: Some("host1".into()),
                    detail: format!("verb {i}\nsecond line"),
                    who: Some("x".repeat(2 * MAX_FIELD)),
                },
            )
            .unwrap();
        }
        let all = recent(&store, usize::MAX).unwrap();
        assert_eq!(all.len(), MAX_EVENTS, "pruned to the bound");
        assert_eq!(all[0].detail, "verb 5 second line", "the oldest went first");
        assert_eq!(
            all.last().unwrap().detail,
            format!("verb {} second line", MAX_EVENTS + 4)
        );
        assert!(all.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert_eq!(all[0].who.as_ref().unwrap().len(), MAX_FIELD);
        let last3 = recent(&store, 3).unwrap();
        assert_eq!(last3.len(), 3);
        assert_eq!(last3[2], *all.last().unwrap());
    }

    #[test]
    fn fields_are_one_bounded_line() {
        let c = clip(&format!("a\nb{}", "x".repeat(1000)));
        assert!(!c.contains('\n') && c.chars().count() == MAX_FIELD);
    }
}

//! What the node changes in its host's network for the IP packet router, and takes back at
//! shutdown: IP forwarding on, and one nftables table of its own that
//!
//! - source-NATs (masquerades) the pools' addresses out of whichever interface the kernel
//!   routes them to, other than the router's device, so answers find their way back;
//! - lets nothing into the router's device that is not an answer to what a client sent
//!   (conntrack `established`/`related`), so no host beside the node, and no connection the
//!   node itself opens, can reach a client;
//! - delivers nothing from the device to the host itself (its addresses, broadcasts,
//!   anycast: whatever the policy's list of own addresses missed), and forwards nothing
//!   conntrack calls invalid, which masquerading would let out with a pool address;
//! - where the node turned forwarding on itself, forwards nothing that neither comes from
//!   nor goes to the device: the host does not become a router for its neighbours.
//!
//! The rules are written with the `nftables` crate: typed objects for the `nft` command's
//! JSON interface, applied in one atomic batch (the crate runs `nft -j`, the interface
//! nftables documents as stable; the netlink-level crates are either bindings to
//! libnftnl, a C library more in the image, or unmaintained). The table is the node's
//! alone: it is replaced whole at start (a crashed run leaves no stale rules behind once the
//! node starts again) and deleted at shutdown, and no other table is touched.

use std::borrow::Cow;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::config::{Ipv4Pool, Ipv6Pool};

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error(
        "the IP packet router needs IP forwarding: {sysctl} is 0 and cannot be set ({error}); set it for the node (docker: --sysctl {sysctl}=1; Kubernetes: the pod's securityContext.sysctls, allowed on the kubelet with --allowed-unsafe-sysctls)"
    )]
    Forwarding { sysctl: &'static str, error: String },
    #[error("nftables ({0}); the IP packet router needs the nft command and CAP_NET_ADMIN")]
    Nft(String),
}

/// The node's nftables table for one router device.
pub struct Nat {
    table: String,
}

const FORWARDING: [(&str, &str); 2] = [
    ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
    (
        "net.ipv6.conf.all.forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ),
];

/// Whether IPv6 works in the node's network namespace (containers often have it off).
pub fn ipv6_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0")
}

/// Turns IPv4 (and with `ipv6`, IPv6) forwarding on in the node's network namespace where
/// it is off; true when it was off (the node, not the host's operator, made it a router).
pub fn enable_forwarding(ipv6: bool) -> Result<bool, NatError> {
    let mut turned_on = false;
    for (sysctl, path) in FORWARDING.into_iter().take(if ipv6 { 2 } else { 1 }) {
        let now = std::fs::read_to_string(path).map_err(|e| NatError::Forwarding {
            sysctl,
            error: e.to_string(),
        })?;
        if now.trim() == "1" {
            continue;
        }
        std::fs::write(path, "1").map_err(|e| NatError::Forwarding {
            sysctl,
            error: e.to_string(),
        })?;
        tracing::info!(sysctl, "turned IP forwarding on for the IP packet router");
        turned_on = true;
    }
    Ok(turned_on)
}

impl Nat {
    /// The table's name for `device` (nftables names take letters, digits and `_`).
    pub fn table_name(device: &str) -> String {
        let clean: String = device
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("nym_node_ipr_{clean}")
    }

    /// Installs (or replaces) the table; `only_device` when forwarding was the node's doing.
    pub async fn install(
        device: &str,
        v4: Ipv4Pool,
        v6: Ipv6Pool,
        only_device: bool,
    ) -> Result<Nat, NatError> {
        let table = Self::table_name(device);
        let mut batch = Batch::new();
        // Add, delete and add again: the delete cannot fail on a missing table, and the
        // whole batch applies at once or not at all.
        batch.add(NfListObject::Table(self::table(&table)));
        batch.delete(NfListObject::Table(self::table(&table)));
        batch.add(NfListObject::Table(self::table(&table)));
        for object in rules(&table, device, v4, v6, only_device) {
            batch.add(object);
        }
        apply(batch).await?;
        Ok(Nat { table })
    }

    /// Deletes the table.
    pub async fn remove(self) -> Result<(), NatError> {
        let mut batch = Batch::new();
        batch.delete(NfListObject::Table(table(&self.table)));
        apply(batch).await
    }
}

async fn apply(batch: Batch<'static>) -> Result<(), NatError> {
    let ruleset = batch.to_nftables();
    tokio::task::spawn_blocking(move || nftables::helper::apply_ruleset(&ruleset))
        .await
        .map_err(|e| NatError::Nft(e.to_string()))?
        .map_err(|e| NatError::Nft(e.to_string()))
}

fn table(name: &str) -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: Cow::Owned(name.to_string()),
        handle: None,
    }
}

fn chain(
    table: &str,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: Cow::Owned(table.to_string()),
        name: Cow::Borrowed(name),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn rule(table: &str, chain: &'static str, expr: Vec<Statement<'static>>) -> Rule<'static> {
    Rule {
        family: NfFamily::INet,
        table: Cow::Owned(table.to_string()),
        chain: Cow::Borrowed(chain),
        expr: Cow::Owned(expr),
        handle: None,
        index: None,
        comment: None,
    }
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn field(protocol: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(name),
        },
    )))
}

fn prefix(address: String, len: u8) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(address))),
        len: u32::from(len),
    }))
}

fn text(s: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(s.to_string()))
}

/// The chains and rules of the table (see the module doc), chain by chain.
fn rules(
    table: &str,
    device: &str,
    v4: Ipv4Pool,
    v6: Ipv6Pool,
    only_device: bool,
) -> Vec<NfListObject<'static>> {
    // srcnat and filter priorities, as `nft` names them.
    let chains = [
        ("input", NfChainType::Filter, NfHook::Input, 0),
        ("output", NfChainType::Filter, NfHook::Output, 0),
        ("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
        ("forward", NfChainType::Filter, NfHook::Forward, 0),
    ];
    let mut out: Vec<_> = chains
        .into_iter()
        .map(|(name, kind, hook, prio)| NfListObject::Chain(chain(table, name, kind, hook, prio)))
        .collect();
    let rules = masquerade(device, v4, v6)
        .into_iter()
        .map(|r| ("postrouting", r))
        .chain(
            forwarding(device, only_device)
                .into_iter()
                .map(|r| ("forward", r)),
        )
        .chain(host(device));
    out.extend(rules.map(|(chain, expr)| NfListObject::Rule(rule(table, chain, expr))));
    out
}

/// postrouting: the pools leave NATed by any interface but the device.
fn masquerade(device: &str, v4: Ipv4Pool, v6: Ipv6Pool) -> Vec<Vec<Statement<'static>>> {
    [
        ("ip", prefix(v4.network.to_string(), v4.prefix)),
        ("ip6", prefix(v6.network.to_string(), v6.prefix)),
    ]
    .into_iter()
    .map(|(family, pool)| {
        vec![
            matches(field(family, "saddr"), Operator::EQ, pool),
            interface(MetaKey::Oifname, Operator::NEQ, device),
            Statement::Masquerade(None),
        ]
    })
    .collect()
}

/// forward: into the device only answers; out of it nothing invalid; and, when the node
/// made the host a router, nothing that does not touch the device.
fn forwarding(device: &str, only_device: bool) -> Vec<Vec<Statement<'static>>> {
    let into = || interface(MetaKey::Oifname, Operator::EQ, device);
    let mut out = vec![
        vec![
            into(),
            in_states(&["established", "related"]),
            Statement::Accept(None),
        ],
        vec![into(), Statement::Drop(None)],
        vec![
            interface(MetaKey::Iifname, Operator::EQ, device),
            in_states(&["invalid"]),
            Statement::Drop(None),
        ],
    ];
    if only_device {
        out.push(vec![
            interface(MetaKey::Iifname, Operator::NEQ, device),
            interface(MetaKey::Oifname, Operator::NEQ, device),
            Statement::Drop(None),
        ]);
    }
    out
}

/// input and output: nothing from the device to the host, nothing the host opens into it.
fn host(device: &str) -> [(&'static str, Vec<Statement<'static>>); 2] {
    [
        (
            "input",
            vec![
                interface(MetaKey::Iifname, Operator::EQ, device),
                Statement::Drop(None),
            ],
        ),
        (
            "output",
            vec![
                interface(MetaKey::Oifname, Operator::EQ, device),
                in_states(&["new"]),
                Statement::Drop(None),
            ],
        ),
    ]
}

fn interface(key: MetaKey, op: Operator, device: &str) -> Statement<'static> {
    matches(meta(key), op, text(device))
}

fn in_states(states: &[&str]) -> Statement<'static> {
    matches(
        ct_state(),
        Operator::IN,
        Expression::List(states.iter().map(|s| text(s)).collect()),
    )
}

fn ct_state() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed("state"),
        family: None,
        dir: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_named_for_its_device_and_masquerades_both_pools() {
        assert_eq!(Nat::table_name("nym-ipr0"), "nym_node_ipr_nym_ipr0");
        let v4 = Ipv4Pool {
            network: "10.64.0.0".parse().unwrap(),
            prefix: 16,
        };
        let v6 = Ipv6Pool {
            network: "fd6e:796d:6970::".parse().unwrap(),
            prefix: 112,
        };
        let json = serde_json::to_string(&rules("t", "nymipr0", v4, v6, true)).unwrap();
        for expected in [
            "10.64.0.0",
            "fd6e:796d:6970::",
            "masquerade",
            "established",
            "nymipr0",
            "postrouting",
        ] {
            assert!(json.contains(expected), "{expected} missing from {json}");
        }
    }
}

//! nftables rules for NAT and isolated networks, through `nft -j` (the JSON interface).
//!
//! rvirt owns one table, `ip rvirt`, with three base chains whose policy is accept, so the table
//! never drops traffic other software lets through. Each network's rules carry the comment
//! `rvirt:<network>`; adding and removing a network's rules is one `nft` transaction, so the
//! ruleset never holds half a network. Other tables are never read for changes nor written.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::xml::ForwardMode;
use crate::Ipv4Net;

pub const TABLE: &str = "rvirt";
const FAMILY: &str = "ip";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (install the nftables package): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the rvirt rules for network '{net}': {stderr}")]
    Refused { net: String, stderr: String },
    #[error("cannot read the nftables table 'ip rvirt': {0}")]
    List(String),
}

/// What a network needs from the firewall.
#[derive(Debug, Clone)]
pub struct NetRules {
    pub network: String,
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub mode: ForwardMode,
}

fn comment(net: &str) -> String {
    format!("rvirt:{net}")
}

fn meta_eq(key: &str, v: &str) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": key}}, "right": v}})
}

fn ip_match(field: &str, op: &str, right: Value) -> Value {
    json!({"match": {"op": op, "left": {"payload": {"protocol": "ip", "field": field}}, "right": right}})
}

fn prefix(n: Ipv4Net) -> Value {
    json!({"prefix": {"addr": n.network().addr.to_string(), "len": n.prefix}})
}

fn rule(net: &str, chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain,
        "comment": comment(net), "expr": expr}}})
}

fn base_chains() -> Vec<Value> {
    let chain = |name: &str, ty: &str, hook: &str, prio: i32| {
        json!({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": name, "type": ty,
            "hook": hook, "prio": prio, "policy": "accept"}}})
    };
    vec![
        json!({"add": {"table": {"family": FAMILY, "name": TABLE}}}),
        chain("input", "filter", "input", 0),
        chain("forward", "filter", "forward", 0),
        chain("postrouting", "nat", "postrouting", 100),
    ]
}

/// The rules of one network, in libvirt's spirit: DHCP/DNS in from the bridge; traffic between
/// guests on the bridge; for NAT, the subnet out and replies back in, masqueraded except towards
/// the subnet itself, multicast and broadcast; everything else to or from the bridge rejected.
pub fn network_rules(r: &NetRules) -> Vec<Value> {
    let (n, br, sub) = (&r.network, r.bridge.as_str(), r.subnet.network());
    let accept = json!({"accept": null});
    let reject = json!({"reject": null});
    let mut rules = vec![
        rule(
            n,
            "input",
            vec![
                meta_eq("iifname", br),
                json!({"match": {"op": "==",
            "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": {"set": [53, 67]}}}),
                accept.clone(),
            ],
        ),
        rule(
            n,
            "input",
            vec![
                meta_eq("iifname", br),
                json!({"match": {"op": "==",
            "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 53}}),
                accept.clone(),
            ],
        ),
        rule(
            n,
            "forward",
            vec![
                meta_eq("iifname", br),
                meta_eq("oifname", br),
                accept.clone(),
            ],
        ),
    ];
    if r.mode == ForwardMode::Nat {
        rules.push(rule(
            n,
            "forward",
            vec![
                meta_eq("iifname", br),
                ip_match("saddr", "==", prefix(sub)),
                accept.clone(),
            ],
        ));
        rules.push(rule(n, "forward", vec![
            meta_eq("oifname", br),
            ip_match("daddr", "==", prefix(sub)),
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}),
            accept.clone(),
        ]));
        for excluded in ["224.0.0.0/24", "255.255.255.255/32"] {
            let ex: Ipv4Net = excluded.parse().expect("constant subnet");
            rules.push(rule(
                n,
                "postrouting",
                vec![
                    ip_match("saddr", "==", prefix(sub)),
                    ip_match("daddr", "==", prefix(ex)),
                    json!({"return": null}),
                ],
            ));
        }
        // As libvirt: TCP and UDP get unprivileged source ports, other protocols plain masquerade.
        for l4 in ["tcp", "udp"] {
            rules.push(rule(
                n,
                "postrouting",
                vec![
                    ip_match("saddr", "==", prefix(sub)),
                    ip_match("daddr", "!=", prefix(sub)),
                    json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": l4}}),
                    json!({"masquerade": {"port": {"range": [1024, 65535]}}}),
                ],
            ));
        }
        rules.push(rule(
            n,
            "postrouting",
            vec![
                ip_match("saddr", "==", prefix(sub)),
                ip_match("daddr", "!=", prefix(sub)),
                json!({"masquerade": null}),
            ],
        ));
    }
    rules.push(rule(
        n,
        "forward",
        vec![meta_eq("iifname", br), reject.clone()],
    ));
    rules.push(rule(n, "forward", vec![meta_eq("oifname", br), reject]));
    rules
}

fn run_nft(net: &str, cmds: Vec<Value>) -> Result<(), NftError> {
    let doc = json!({"nftables": cmds}).to_string();
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(doc.as_bytes())
        .map_err(NftError::Spawn)?;
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Refused {
            net: net.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok(())
}

/// Lists rvirt's table as JSON objects; empty when the table does not exist.
fn list_table() -> Result<Vec<Value>, NftError> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", FAMILY, TABLE])
        .output()
        .map_err(NftError::Spawn)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file") {
            return Ok(Vec::new());
        }
        return Err(NftError::List(err.trim().into()));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| NftError::List(e.to_string()))?;
    Ok(v["nftables"].as_array().cloned().unwrap_or_default())
}

/// Handles `(chain, handle)` of the rules tagged for `net`.
pub fn rule_handles(net: &str) -> Result<Vec<(String, u64)>, NftError> {
    let want = comment(net);
    Ok(list_table()?
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["comment"].as_str() == Some(want.as_str()))
        .filter_map(|r| Some((r["chain"].as_str()?.to_owned(), r["handle"].as_u64()?)))
        .collect())
}

fn delete_ops(net: &str) -> Result<Vec<Value>, NftError> {
    Ok(rule_handles(net)?
        .into_iter()
        .map(|(chain, handle)| {
            json!({"delete": {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "handle": handle}}})
        })
        .collect())
}

/// Installs the network's rules, replacing any left by an earlier run, in one transaction.
pub fn add_network(r: &NetRules) -> Result<(), NftError> {
    let mut cmds = base_chains();
    cmds.extend(delete_ops(&r.network)?);
    cmds.extend(network_rules(r));
    run_nft(&r.network, cmds)
}

/// Removes the network's rules in one transaction; drops the table when no network is left.
pub fn remove_network(net: &str) -> Result<(), NftError> {
    let mut cmds = delete_ops(net)?;
    let others = list_table()?
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["comment"].as_str() != Some(comment(net).as_str()))
        .count();
    if others == 0 && !list_table()?.is_empty() {
        cmds = vec![json!({"delete": {"table": {"family": FAMILY, "name": TABLE}}})];
    }
    if cmds.is_empty() {
        return Ok(());
    }
    run_nft(net, cmds)
}

/// Turns on IPv4 forwarding in the current network namespace (NAT needs it). Like libvirt, it is
/// left on when the network stops: other software may rely on it by then.
pub fn enable_ipv4_forwarding() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(mode: ForwardMode) -> Vec<Value> {
        network_rules(&NetRules {
            network: "n".into(),
            bridge: "rvb0".into(),
            subnet: "10.1.0.1/24".parse().unwrap(),
            mode,
        })
    }

    #[test]
    fn every_rule_is_tagged_and_in_rvirts_table() {
        for mode in [ForwardMode::Nat, ForwardMode::Isolated] {
            for r in rules(mode) {
                let r = &r["add"]["rule"];
                assert_eq!(
                    (r["family"].as_str(), r["table"].as_str()),
                    (Some("ip"), Some("rvirt"))
                );
                assert_eq!(r["comment"], "rvirt:n");
            }
        }
    }

    #[test]
    fn masquerade_only_for_nat_and_not_to_the_subnet() {
        let text = |m| serde_json::to_string(&rules(m)).unwrap();
        assert!(!text(ForwardMode::Isolated).contains("masquerade"));
        let nat = rules(ForwardMode::Nat);
        let masq = nat
            .iter()
            .find(|r| r.to_string().contains("masquerade"))
            .unwrap()
            .to_string();
        assert!(
            masq.contains(r#""op":"!=""#) && masq.contains(r#""addr":"10.1.0.0","len":24"#),
            "{masq}"
        );
        // Rejects come last so the accepts before them decide.
        let last = nat.last().unwrap().to_string();
        assert!(last.contains("reject"), "{last}");
    }
}

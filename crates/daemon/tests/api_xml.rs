//! The XML corpus through the real daemon: define over the API, restart the daemon, dumpxml —
//! every element, attribute, text and comment of each file is still there.

mod common;

use common::Daemon;
use rvirtd::xml::tree::Node;
use rvirtd::xml::Element;
use serde_json::json;
use std::collections::HashMap;

fn flatten(el: &Element, prefix: &str, out: &mut Vec<String>) {
    let path = format!("{prefix}/{}", el.name);
    let mut attrs: Vec<String> = el.attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    attrs.sort();
    out.push(format!("{path} [{}] '{}'", attrs.join(" "), el.text()));
    for n in &el.children {
        match n {
            Node::Element(c) => flatten(c, &path, out),
            Node::Comment(c) => out.push(format!("{path} <!--{c}-->")),
            _ => {}
        }
    }
}

fn counts(xml: &str) -> HashMap<String, usize> {
    let mut v = Vec::new();
    flatten(&Element::parse(xml).unwrap(), "", &mut v);
    let mut m = HashMap::new();
    for l in v {
        *m.entry(l).or_insert(0) += 1;
    }
    m
}

#[test]
fn corpus_survives_define_restart_and_dumpxml() {
    let mut d = Daemon::start();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xml");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut names = Vec::new();
    for f in &files {
        let xml = std::fs::read_to_string(f).unwrap();
        let r = d.ok("POST", "/v1/domains", Some(json!({"xml": xml})));
        names.push((r["name"].as_str().unwrap().to_string(), xml));
    }
    d.kill9();
    d.spawn();
    for (name, original) in &names {
        let dumped = d.ok("GET", &format!("/v1/domains/{name}/xml"), None)["xml"]
            .as_str()
            .unwrap()
            .to_string();
        let have = counts(&dumped);
        for (line, n) in counts(original) {
            assert!(
                have.get(&line).copied().unwrap_or(0) >= n,
                "{name}: '{line}' lost after define + restart:\n{dumped}"
            );
        }
        // What was added is only what define generates: a uuid, MACs, and for UEFI guests
        // the loader and a per-domain variable store (as libvirt fills them in).
        let orig = counts(original);
        let uefi = original.contains("firmware='efi'");
        for line in have.keys().filter(|l| !orig.contains_key(*l)) {
            assert!(
                line.starts_with("/domain/uuid ")
                    || line.starts_with("/domain/devices/interface/mac ")
                    || (uefi
                        && (line.starts_with("/domain/os/loader ")
                            || line.starts_with("/domain/os/nvram "))),
                "{name}: unexpected addition '{line}'"
            );
        }
    }
}

//! Drives a [`rvirt_net::NetworkManager`] from the command line, for manual checks inside a
//! network namespace: `netctl STATE RUN define FILE | start NAME | destroy NAME | leases NAME`.

use rvirt_net::NetworkManager;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!(
            "usage: netctl STATE_DIR RUN_DIR define FILE|start NAME|destroy NAME|leases NAME"
        );
        std::process::exit(2);
    }
    let m = NetworkManager::open(a[1].as_ref(), a[2].as_ref()).unwrap_or_else(|e| fail(e));
    let r = match a[3].as_str() {
        "define" => std::fs::read_to_string(&a[4])
            .map_err(|e| e.to_string())
            .and_then(|x| {
                m.define(&x)
                    .map(|d| println!("defined {}", d.name))
                    .map_err(|e| e.to_string())
            }),
        "start" => m.start(&a[4]).map_err(|e| e.to_string()),
        "destroy" => m.destroy(&a[4], false).map_err(|e| e.to_string()),
        "leases" => m
            .leases(&a[4])
            .map(|l| {
                l.iter()
                    .for_each(|l| println!("{} {} {:?}", l.mac, l.ip, l.hostname))
            })
            .map_err(|e| e.to_string()),
        other => Err(format!("unknown verb {other}")),
    };
    if let Err(e) = r {
        fail(e);
    }
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}

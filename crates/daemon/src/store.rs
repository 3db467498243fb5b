//! Persistent domain definitions under the state dir, written atomically:
//!
//! ```text
//! STATE/domains/NAME.xml      the definition (libvirt domain XML)
//! STATE/autostart/NAME.xml    symlink to ../domains/NAME.xml when autostart is on
//! STATE/log/NAME.log          per-domain log (VMM output, lifecycle lines)
//! ```

use crate::xml::{Domain, DomainXmlError};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("stored definition {path} is invalid: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: DomainXmlError,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// A definition read back from disk.
pub struct Stored {
    pub domain: Domain,
    pub autostart: bool,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Writes `data` to `path` so that a crash leaves either the old or the new content: a temp file
/// in the same directory, fsync, rename over the target, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp{}.{seq}", std::process::id()));
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        // Definitions can hold paths and kernel command lines: readable by the daemon's user only.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl Store {
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for sub in ["domains", "autostart", "log"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("create directory", &p))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn definition_path(&self, name: &str) -> PathBuf {
        self.root.join("domains").join(format!("{name}.xml"))
    }

    fn autostart_path(&self, name: &str) -> PathBuf {
        self.root.join("autostart").join(format!("{name}.xml"))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.root.join("log").join(format!("{name}.log"))
    }

    /// Reads every stored definition. Files that fail to parse are reported, not dropped: the
    /// caller logs them and leaves them on disk for the user to fix.
    pub fn load_all(&self) -> Result<(Vec<Stored>, Vec<StoreError>), StoreError> {
        let dir = self.root.join("domains");
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err("read directory", &dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "xml"))
            .collect();
        entries.sort();
        for path in entries {
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    bad.push(io_err("read", &path)(e));
                    continue;
                }
            };
            match Domain::parse(&text) {
                Ok(domain) => {
                    let autostart = self.autostart_path(&domain.def.name).exists();
                    good.push(Stored { domain, autostart });
                }
                Err(source) => bad.push(StoreError::Invalid { path, source }),
            }
        }
        Ok((good, bad))
    }

    pub fn save(&self, domain: &Domain) -> Result<(), StoreError> {
        let path = self.definition_path(&domain.def.name);
        write_atomic(&path, domain.to_xml().as_bytes()).map_err(io_err("write", &path))
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        self.set_autostart(name, false)?;
        let path = self.definition_path(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    pub fn set_autostart(&self, name: &str, on: bool) -> Result<(), StoreError> {
        let link = self.autostart_path(name);
        let _ = fs::remove_file(&link);
        if on {
            let target = Path::new("../domains").join(format!("{name}.xml"));
            std::os::unix::fs::symlink(&target, &link).map_err(io_err("create symlink", &link))?;
        }
        Ok(())
    }
}

/// A random locally administered MAC in QEMU/libvirt's 52:54:00 range.
pub fn random_mac() -> String {
    let b = uuid::Uuid::new_v4();
    let b = b.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

pub fn random_uuid() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str =
        "<domain type='kvm'><name>a</name><memory>1024</memory><os><type>hvm</type></os></domain>";

    #[test]
    fn save_load_remove_and_autostart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut d = Domain::parse(XML).unwrap();
        d.set_uuid(&random_uuid());
        store.save(&d).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(store.definition_path("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        store.set_autostart("a", true).unwrap();
        fs::write(dir.path().join("domains/broken.xml"), "<domain").unwrap();
        let (good, bad) = store.load_all().unwrap();
        assert_eq!(good.len(), 1);
        assert!(good[0].autostart);
        assert_eq!(good[0].domain.def.uuid, d.def.uuid);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].to_string().contains("broken.xml"), "{}", bad[0]);
        store.remove("a").unwrap();
        assert!(!store.definition_path("a").exists());
        assert!(!dir.path().join("autostart/a.xml").exists());
        // No temp files are left behind.
        let left: Vec<_> = fs::read_dir(dir.path().join("domains")).unwrap().collect();
        assert_eq!(left.len(), 1, "only broken.xml remains");
    }

    #[test]
    fn macs_are_in_qemu_range() {
        let m = random_mac();
        assert!(
            m.starts_with("52:54:00:") && crate::xml::domain::validate_mac(&m),
            "{m}"
        );
    }
}

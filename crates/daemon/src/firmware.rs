//! Firmware for domains without `<kernel>`: which image boots them and where a UEFI guest's
//! variable store lives. The images are Debian's packaged ones, the pair libvirt picks on
//! Debian (OVMF_CODE_4M.fd with a per-domain copy of OVMF_VARS_4M.fd; not the Secure Boot/SMM
//! build) and SeaBIOS's bios-256k.bin.

use std::path::{Path, PathBuf};

use crate::error::{ApiError, ApiResult};
use crate::xml::domain::Firmware;
use rvirt_api::rest::ErrorCode;

/// UEFI code image (Debian's `ovmf` package).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Its variable store template.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// BIOS image (Debian's `seabios` package).
pub const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

/// The Debian package that ships `path`, for error messages.
fn package_of(path: &str) -> Option<&'static str> {
    if path.starts_with("/usr/share/OVMF/") {
        Some("ovmf")
    } else if path.starts_with("/usr/share/seabios/") {
        Some("seabios")
    } else {
        None
    }
}

/// Where the per-domain variable store goes when the definition does not say (libvirt's
/// `<nvram>` default, `nvram/NAME_VARS.fd` under its state directory).
pub fn default_nvram(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("nvram").join(format!("{name}_VARS.fd"))
}

/// The code image `fw` boots.
pub fn loader_of(fw: &Firmware) -> String {
    fw.loader.clone().unwrap_or_else(|| {
        if fw.kind == "efi" {
            OVMF_CODE.to_string()
        } else {
            SEABIOS.to_string()
        }
    })
}

/// Checks that `path` (a firmware image or template) is readable; a missing packaged image
/// names the package to install.
pub fn check_image(path: &str, what: &str) -> ApiResult<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ApiError::failed(format!("{what} {path} is not a file"))),
        Err(e) => {
            let hint = match package_of(path) {
                Some(p) => format!("; install Debian's {p} package"),
                None => "; fix the path in the domain XML".to_string(),
            };
            Err(ApiError::new(
                ErrorCode::OperationFailed,
                format!("Cannot access {what} '{path}': {e}{hint}"),
            ))
        }
    }
}

/// Makes sure the UEFI variable store exists: a missing one is copied from its template (as
/// libvirt does at start), so Boot#### entries an installed OS writes survive power-off.
/// Returns the store's path.
pub fn prepare_nvram(fw: &Firmware, name: &str) -> ApiResult<Option<PathBuf>> {
    if fw.kind != "efi" {
        return Ok(None);
    }
    let path = PathBuf::from(fw.nvram.as_deref().ok_or_else(|| {
        ApiError::internal(format!(
            "domain '{name}' has UEFI firmware but no <nvram> path"
        ))
    })?);
    if path.exists() {
        return Ok(Some(path));
    }
    let template = fw.nvram_template.as_deref().unwrap_or(OVMF_VARS);
    check_image(template, "the NVRAM template")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            ApiError::failed(format!(
                "cannot create the NVRAM directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    let bytes = std::fs::read(template)
        .map_err(|e| ApiError::failed(format!("cannot read NVRAM template {template}: {e}")))?;
    crate::store::write_atomic(&path, &bytes).map_err(|e| {
        ApiError::failed(format!(
            "cannot create the NVRAM {} from {template}: {e}",
            path.display()
        ))
    })?;
    tracing::info!(
        "domain '{name}': NVRAM {} created from {template}",
        path.display()
    );
    Ok(Some(path))
}

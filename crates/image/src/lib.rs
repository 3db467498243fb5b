//! Disk images for rvirt: raw and qcow2, with the qemu-img semantics users know.

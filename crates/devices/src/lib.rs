//! Emulated devices for rvirt-vmm: PCI config space and bus, virtio-over-PCI transport and devices.

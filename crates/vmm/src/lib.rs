//! rvirt-vmm: the virtual machine monitor library.

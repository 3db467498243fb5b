//! KVM state: the VM ([`vm::Vm`]: /dev/kvm, the VM fd, guest memory, irqchip and clock) and
//! one vCPU's set-up and kick ([`vcpu`]). The threads that run vCPUs are
//! [`crate::vcpu_manager`]'s.

pub mod vcpu;
pub mod vm;

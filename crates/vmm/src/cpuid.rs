//! The CPUID each vCPU sees: KVM's supported CPUID with the topology of this VM.
//!
//! Every vCPU is one core with one thread in one package; its APIC id is its index. Intel
//! leaves: 1 (initial APIC id, logical count, HTT, hypervisor bit), 4 (cores per package, caches
//! private), 0xB/0x1F (x2APIC id, SMT and core levels). AMD leaves: 0x80000001 (CmpLegacy),
//! 0x80000008 ECX (NC = vCPUs - 1, ApicIdSize = APIC id bits), 0x8000001D (caches private),
//! 0x8000001E (extended APIC id, core id, one thread per core, one node). 0x40000000 carries the
//! `KVMKVMKVM` signature so Linux uses the KVM clock and PV features.

use kvm_bindings::kvm_cpuid_entry2;

/// Bits needed to hold APIC ids 0..ncpus.
pub fn apic_id_bits(ncpus: u32) -> u32 {
    32 - (ncpus.max(1) - 1).leading_zeros()
}

/// The 0x40000000 leaf (KVM signature), for when KVM did not report one.
pub fn hypervisor_leaf() -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: 0x4000_0000,
        eax: 0x4000_0001,
        ebx: u32::from_le_bytes(*b"KVMK"),
        ecx: u32::from_le_bytes(*b"VMKV"),
        edx: u32::from_le_bytes(*b"M\0\0\0"),
        ..Default::default()
    }
}

/// Patch `entries` (KVM_GET_SUPPORTED_CPUID) for vCPU `id` of `ncpus`. Returns whether a
/// 0x40000000 leaf was present (else add [`hypervisor_leaf`]).
pub fn patch(entries: &mut [kvm_cpuid_entry2], id: u32, ncpus: u32) -> bool {
    let ncpus = ncpus.max(1);
    let shift = apic_id_bits(ncpus);
    let mut have_sig = false;
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (ncpus.min(255) << 16);
                e.ecx |= 1 << 31; // hypervisor
                if ncpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count in EBX is valid
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((ncpus.min(64) - 1) << 26);
                // Caches are private to each vCPU.
                e.eax &= !(0xfff << 14);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = ncpus;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x4000_0000 => {
                have_sig = true;
                e.ebx = u32::from_le_bytes(*b"KVMK");
                e.ecx = u32::from_le_bytes(*b"VMKV");
                e.edx = u32::from_le_bytes(*b"M\0\0\0");
            }
            0x8000_0001 => {
                // CmpLegacy: HTT/leaf 1's count means cores, not hyper-threads.
                if ncpus > 1 {
                    e.ecx |= 1 << 1;
                } else {
                    e.ecx &= !(1 << 1);
                }
            }
            0x8000_0008 => {
                // NC (7:0) = threads in the package - 1; ApicIdSize (15:12); keep PerfTscSize
                // (17:16) and the rest.
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (ncpus.min(256) - 1);
            }
            0x8000_001d => {
                // NumSharingCache (25:14) = 0: caches are private to each vCPU.
                e.eax &= !(0xfff << 14);
            }
            0x8000_001e => {
                e.eax = id; // extended APIC id
                e.ebx = id & 0xff; // core id; ThreadsPerCore (15:8) = 0: one thread per core
                e.ecx = 0; // node 0, one node per package
                e.edx = 0;
            }
            _ => {}
        }
    }
    have_sig
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        let mut v = vec![
            leaf(1, 0),
            leaf(4, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
        ];
        v.extend([
            leaf(0x8000_0001, 0),
            leaf(0x8000_0008, 0),
            leaf(0x8000_001d, 0),
            leaf(0x8000_001e, 0),
        ]);
        // A realistic 0x80000008 ECX: PerfTscSize 2, ApicIdSize 7, NC 127.
        v[6].ecx = (2 << 16) | (7 << 12) | 127;
        v
    }

    fn get(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_id_bits_cover_every_vcpu() {
        for (n, bits) in [
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (8, 3),
            (9, 4),
            (254, 8),
        ] {
            assert_eq!(apic_id_bits(n), bits, "{n} vCPUs");
        }
    }

    #[test]
    fn amd_topology_matches_vcpu_count_and_apic_ids() {
        for (id, n) in [(0, 1), (1, 2), (2, 3), (5, 6)] {
            let mut v = host();
            assert!(!patch(&mut v, id, n));
            let e = get(&v, 0x8000_0008, 0);
            assert_eq!(e.ecx & 0xff, n - 1, "NC for {n} vCPUs");
            assert_eq!((e.ecx >> 12) & 0xf, apic_id_bits(n), "ApicIdSize for {n}");
            assert_eq!(e.ecx >> 16, 2, "PerfTscSize kept");
            let e = get(&v, 0x8000_001e, 0);
            assert_eq!(e.eax, id, "extended APIC id");
            assert_eq!(e.ebx & 0xff, id, "core id");
            assert_eq!((e.ebx >> 8) & 0xff, 0, "one thread per core");
            assert_eq!(e.ecx & 0x7ff, 0, "node 0 of 1");
            let cmp_legacy = get(&v, 0x8000_0001, 0).ecx & 2 != 0;
            assert_eq!(cmp_legacy, n > 1);
            assert_eq!((get(&v, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
            // Leaf 1 agrees: initial APIC id and logical count.
            let e = get(&v, 1, 0);
            assert_eq!(e.ebx >> 24, id);
            assert_eq!((e.ebx >> 16) & 0xff, n);
            assert_eq!(e.edx & (1 << 28) != 0, n > 1);
            assert_ne!(e.ecx & (1 << 31), 0, "hypervisor bit");
        }
    }

    #[test]
    fn intel_topology_matches_vcpu_count_and_apic_ids() {
        let mut v = host();
        patch(&mut v, 3, 4);
        let smt = get(&v, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 1 << 8, 3));
        let core = get(&v, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx, core.edx),
            (2, 4, (2 << 8) | 1, 3)
        );
        let end = get(&v, 0xb, 2);
        assert_eq!((end.ebx, end.ecx & 0xff00), (0, 0));
        let l4 = get(&v, 4, 0);
        assert_eq!(l4.eax >> 26, 3, "cores per package - 1");
        assert_eq!((l4.eax >> 14) & 0xfff, 0);
    }

    #[test]
    fn hypervisor_signature() {
        let mut v = host();
        v.push(leaf(0x4000_0000, 0));
        assert!(patch(&mut v, 0, 1));
        let e = get(&v, 0x4000_0000, 0);
        let mut sig = Vec::new();
        for r in [e.ebx, e.ecx, e.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig[..9], b"KVMKVMKVM");
        assert_eq!(hypervisor_leaf().ebx, e.ebx);
    }
}

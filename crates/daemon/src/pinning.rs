//! vCPU and emulator thread pinning (virsh vcpupin / emulatorpin / vcpuinfo).

use crate::error::{ApiError, ApiResult};
use crate::host;
use crate::manager::{Manager, Run, Slot};
use crate::vmm_client;
use crate::xml::{CpuSet, DomainDef};
use rvirt_api::rest::{PinInfo, PinScope, VcpuInfo, VcpuPin};
use rvirt_api::vmm::{Request, Response, VcpuThread};
use std::sync::Arc;

async fn vcpu_threads(run: &Run) -> ApiResult<Vec<VcpuThread>> {
    match vmm_client::request(&run.api_socket, &Request::VcpuInfo).await {
        Ok(Response::VcpuInfo { vcpus }) => Ok(vcpus),
        Ok(other) => Err(ApiError::failed(format!("unexpected VMM answer {other:?}"))),
        Err(e) => Err(ApiError::failed(format!("cannot read vCPU threads: {e}"))),
    }
}

/// Every thread of the VMM (`/proc/PID/task`) that is not one of `vcpus`: the emulator
/// threads (main, control, serial, device workers).
fn emulator_threads(run: &Run, vcpus: &[VcpuThread]) -> Vec<i32> {
    host::threads(run.pid)
        .into_iter()
        .map(|(tid, _)| tid)
        .filter(|tid| !vcpus.iter().any(|v| v.tid == *tid))
        .collect()
}

fn set(tid: i32, cpus: &CpuSet, what: &str) -> ApiResult<()> {
    if tid <= 0 {
        // Thread id 0 would be the caller (the daemon) itself.
        return Err(ApiError::failed(format!(
            "the VMM reported no thread id for {what}; not pinned"
        )));
    }
    host::set_affinity(tid, cpus).map_err(|e| {
        ApiError::failed(format!(
            "cannot set the affinity of {what} (thread {tid}): {e}"
        ))
    })
}

impl Manager {
    /// Applies `<cputune>` and `<vcpu cpuset>` at start, while the VMM is still paused (it
    /// starts with `start_paused`), so no vCPU runs unpinned and threads the VMM starts later
    /// inherit the emulator affinity. Failures are logged, not fatal: the VM runs, unpinned,
    /// as libvirt would after a cgroup error.
    pub async fn apply_cputune(&self, run: &Run, def: &DomainDef) {
        if def.vcpupin.is_empty() && def.emulatorpin.is_none() && def.vcpu_cpuset.is_none() {
            return;
        }
        let result: ApiResult<()> = async {
            let threads = vcpu_threads(run).await?;
            for t in &threads {
                let pin = def
                    .vcpupin
                    .iter()
                    .find(|(v, _)| *v == t.vcpu)
                    .map(|(_, c)| c);
                if let Some(cpus) = pin.or(def.vcpu_cpuset.as_ref()) {
                    set(t.tid, cpus, &format!("vcpu {}", t.vcpu))?;
                }
            }
            if let Some(cpus) = def.emulatorpin.as_ref().or(def.vcpu_cpuset.as_ref()) {
                for tid in emulator_threads(run, &threads) {
                    set(tid, cpus, "the emulator")?;
                }
            }
            self.log(
                &run.name,
                &format!(
                    "cputune applied to {} vCPU threads while paused",
                    threads.len()
                ),
            );
            Ok(())
        }
        .await;
        if let Err(e) = result {
            self.log(&run.name, &format!("cputune not applied: {e}"));
            tracing::warn!("domain {}: cputune not applied: {e}", run.name);
        }
    }

    fn parse_cpuset(&self, text: &str) -> ApiResult<CpuSet> {
        let set = CpuSet::parse(text).map_err(|e| ApiError::invalid_arg(e.to_string()))?;
        set.check_host(self.host_cpus)
            .map_err(|e| ApiError::invalid_arg(e.to_string()))?;
        Ok(set)
    }

    /// Resolves virsh's --live/--config/--current: the default is live when active.
    fn scope(slot: &Slot, scope: PinScope) -> ApiResult<(Option<Run>, bool)> {
        let st = slot.lock();
        let (live, config) =
            crate::live::scope_targets(st.state.is_active(), st.persistent, scope)?;
        Ok((if live { st.run.clone() } else { None }, config))
    }

    pub async fn vcpupin(
        self: &Arc<Self>,
        key: &str,
        vcpu: u32,
        cpuset: &str,
        scope: PinScope,
    ) -> ApiResult<()> {
        let (_, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let cpus = self.parse_cpuset(cpuset)?;
        let vcpus = {
            let st = slot.lock();
            st.live.as_ref().unwrap_or(&st.config).def.vcpus
        };
        if vcpu >= vcpus {
            return Err(ApiError::invalid_arg(format!(
                "vcpu {vcpu} is out of range: the domain has vCPUs 0-{}",
                vcpus - 1
            )));
        }
        let (run, config) = Self::scope(&slot, scope)?;
        if let Some(run) = run {
            let threads = vcpu_threads(&run).await?;
            let t = threads.iter().find(|t| t.vcpu == vcpu).ok_or_else(|| {
                ApiError::invalid_arg(format!("vcpu {vcpu} is not online in the running domain"))
            })?;
            set(t.tid, &cpus, &format!("vcpu {vcpu}"))?;
        }
        if config {
            let mut st = slot.lock();
            let mut dom = st.config.clone();
            dom.set_vcpupin(vcpu, &cpus)?;
            self.store.save(&dom)?;
            st.config = dom;
        }
        Ok(())
    }

    pub async fn emulatorpin(
        self: &Arc<Self>,
        key: &str,
        cpuset: &str,
        scope: PinScope,
    ) -> ApiResult<()> {
        let (_, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let cpus = self.parse_cpuset(cpuset)?;
        let (run, config) = Self::scope(&slot, scope)?;
        if let Some(run) = run {
            let vcpus = vcpu_threads(&run).await?;
            for tid in emulator_threads(&run, &vcpus) {
                set(tid, &cpus, "the emulator")?;
            }
        }
        if config {
            let mut st = slot.lock();
            let mut dom = st.config.clone();
            dom.set_emulatorpin(&cpus)?;
            self.store.save(&dom)?;
            st.config = dom;
        }
        Ok(())
    }

    /// Current pinning: live thread affinities when active, else the configuration.
    pub async fn pin_info(&self, key: &str) -> ApiResult<PinInfo> {
        let (_, slot) = self.find(key)?;
        let (run, def) = {
            let st = slot.lock();
            (
                st.run.clone(),
                st.live.as_ref().unwrap_or(&st.config).def.clone(),
            )
        };
        let all = CpuSet::all(self.host_cpus);
        if let Some(run) = run {
            let mut vcpus = Vec::new();
            for t in vcpu_threads(&run).await? {
                let aff = host::get_affinity(t.tid).unwrap_or_else(|_| all.clone());
                vcpus.push(VcpuPin {
                    vcpu: t.vcpu,
                    affinity: aff.to_string(),
                });
            }
            let emulator = host::get_affinity(run.pid as i32).unwrap_or(all);
            return Ok(PinInfo {
                host_cpus: self.host_cpus,
                vcpus,
                emulator: emulator.to_string(),
            });
        }
        let default = def.vcpu_cpuset.clone().unwrap_or_else(|| all.clone());
        let vcpus = (0..def.vcpus)
            .map(|v| {
                let pin = def.vcpupin.iter().find(|(p, _)| *p == v).map(|(_, c)| c);
                VcpuPin {
                    vcpu: v,
                    affinity: pin.unwrap_or(&default).to_string(),
                }
            })
            .collect();
        let emulator = def.emulatorpin.clone().unwrap_or(default).to_string();
        Ok(PinInfo {
            host_cpus: self.host_cpus,
            vcpus,
            emulator,
        })
    }

    pub async fn vcpu_info(&self, key: &str) -> ApiResult<Vec<VcpuInfo>> {
        let (_, slot) = self.find(key)?;
        let run = Self::active_run_of(&slot)?;
        let mut out = Vec::new();
        for t in vcpu_threads(&run).await? {
            let stat = host::thread_stat(run.pid, t.tid);
            let aff = host::get_affinity(t.tid).unwrap_or_else(|_| CpuSet::all(self.host_cpus));
            out.push(VcpuInfo {
                vcpu: t.vcpu,
                cpu: stat.and_then(|s| s.processor),
                state: match t.state {
                    rvirt_api::vmm::RunState::Paused => "paused",
                    _ => "running",
                }
                .into(),
                cpu_time_ns: stat.map_or(0, |s| s.cpu_time_ns),
                affinity: aff.to_string(),
                affinity_map: aff.map_string(self.host_cpus),
                tid: t.tid,
            });
        }
        Ok(out)
    }

    fn active_run_of(slot: &Slot) -> ApiResult<Run> {
        let st = slot.lock();
        match &st.run {
            Some(r) if st.state.is_active() => Ok(r.clone()),
            _ => Err(ApiError::not_running()),
        }
    }
}

//! A container's resource counters read straight from its cgroup (v1 and v2),
//! instead of one Docker stats call per task per collection interval: the
//! files are found once from the container's init process
//! (`/proc/<pid>/cgroup`), then every sample is a few small reads.

use std::path::{Path, PathBuf};

use crate::runtime::Stats;

/// Where a container's counters are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupFiles {
    /// cgroup v2: one directory.
    V2(PathBuf),
    /// cgroup v1: the cpu, cpuacct and memory controllers' directories.
    V1 { cpu: PathBuf, cpuacct: PathBuf, memory: PathBuf },
}

/// The cgroup of process `pid`, from `/proc/<pid>/cgroup` under `root` (`/sys/fs/cgroup`).
pub fn locate(pid: i64, root: &Path) -> Option<CgroupFiles> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    locate_in(&text, root)
}

/// [`locate`] from the text of a `/proc/<pid>/cgroup` file.
pub fn locate_in(text: &str, root: &Path) -> Option<CgroupFiles> {
    let mut v1: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            unified = Some(path);
        }
        for c in controllers.split(',') {
            v1.insert(c, path);
        }
    }
    let under = |dir: &str, path: &str| root.join(dir).join(path.trim_start_matches('/'));
    // A v1 (or hybrid) host names its controllers; a v2 host has only "0::".
    if let (Some(cpu), Some(acct), Some(mem)) = (v1.get("cpu"), v1.get("cpuacct"), v1.get("memory")) {
        let pick = |names: &[&str], path: &str| {
            names.iter().map(|n| under(n, path)).find(|p| p.is_dir()).unwrap_or_else(|| under(names[0], path))
        };
        return Some(CgroupFiles::V1 {
            cpu: pick(&["cpu", "cpu,cpuacct"], cpu),
            cpuacct: pick(&["cpuacct", "cpu,cpuacct"], acct),
            memory: under("memory", mem),
        });
    }
    unified.map(|p| root.join(p.trim_start_matches('/'))).map(CgroupFiles::V2)
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn number(p: &Path) -> Option<u64> {
    read(p)?.trim().parse().ok()
}

/// `key value` lines (cpu.stat, memory.stat, cpuacct.stat).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Host CPU time of all cores in nanoseconds (`/proc/stat`'s first line, as Docker's
/// `system_cpu_usage`) and the number of online cores.
pub fn host_cpu() -> Option<(u64, u32)> {
    host_cpu_in(&read(Path::new("/proc/stat"))?, clock_ticks())
}

/// [`host_cpu`] from the text of `/proc/stat`.
pub fn host_cpu_in(text: &str, ticks_per_second: u64) -> Option<(u64, u32)> {
    let first = text.lines().next()?.strip_prefix("cpu ")?;
    let jiffies: u64 = first.split_whitespace().take(8).filter_map(|v| v.parse::<u64>().ok()).sum();
    let cores =
        text.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count();
    Some((
        jiffies.saturating_mul(1_000_000_000 / ticks_per_second.max(1)),
        u32::try_from(cores.max(1)).unwrap_or(u32::MAX),
    ))
}

/// `/proc/stat` counts in USER_HZ, which the kernel's ABI fixes at 100 on the
/// architectures we run on (x86_64, aarch64), whatever the kernel's HZ.
fn clock_ticks() -> u64 {
    100
}

/// One sample of the container's counters; `None` when its cgroup is gone or unreadable.
pub fn sample(files: &CgroupFiles) -> Option<Stats> {
    let (system_cpu_ns, online_cpus) = host_cpu()?;
    let mut s = Stats { system_cpu_ns, online_cpus, ..Stats::default() };
    match files {
        CgroupFiles::V2(dir) => {
            let cpu = read(&dir.join("cpu.stat"))?;
            s.cpu_total_ns = keyed(&cpu, "usage_usec")? * 1000;
            s.cpu_user_ns = keyed(&cpu, "user_usec").unwrap_or(0) * 1000;
            s.cpu_kernel_ns = keyed(&cpu, "system_usec").unwrap_or(0) * 1000;
            s.throttled_periods = keyed(&cpu, "nr_throttled").unwrap_or(0);
            s.throttled_time_ns = keyed(&cpu, "throttled_usec").unwrap_or(0) * 1000;
            s.mem_usage = number(&dir.join("memory.current"))?;
            s.mem_max = number(&dir.join("memory.peak")).unwrap_or(0);
            s.mem_swap = number(&dir.join("memory.swap.current")).unwrap_or(0);
            let mem = read(&dir.join("memory.stat")).unwrap_or_default();
            s.mem_rss = keyed(&mem, "anon").unwrap_or(0);
            s.mem_cache = keyed(&mem, "file").unwrap_or(0);
        }
        CgroupFiles::V1 { cpu, cpuacct, memory } => {
            s.cpu_total_ns = number(&cpuacct.join("cpuacct.usage"))?;
            s.cpu_user_ns = number(&cpuacct.join("cpuacct.usage_user")).unwrap_or(0);
            s.cpu_kernel_ns = number(&cpuacct.join("cpuacct.usage_sys")).unwrap_or(0);
            let throttling = read(&cpu.join("cpu.stat")).unwrap_or_default();
            s.throttled_periods = keyed(&throttling, "nr_throttled").unwrap_or(0);
            s.throttled_time_ns = keyed(&throttling, "throttled_time").unwrap_or(0);
            s.mem_usage = number(&memory.join("memory.usage_in_bytes"))?;
            s.mem_max = number(&memory.join("memory.max_usage_in_bytes")).unwrap_or(0);
            let mem = read(&memory.join("memory.stat")).unwrap_or_default();
            s.mem_rss = keyed(&mem, "rss").unwrap_or(0);
            s.mem_cache = keyed(&mem, "cache").unwrap_or(0);
            s.mem_swap = keyed(&mem, "swap").unwrap_or(0);
        }
    }
    Some(s)
}

/// How often a shared-cores task's cpuset follows Nomad's (`drivers/docker/cpuset.go`).
pub const CPUSET_SYNC: std::time::Duration = std::time::Duration::from_secs(3);

/// Copies the cores Nomad grants a task (`<cpuset_cgroup>/cpuset.cpus.effective`,
/// which changes as other tasks reserve cores) into the container's own cgroup
/// (`cpuset.cpus`), as the docker driver's cpuset fixer does: Docker cannot put a
/// container in a cgroup Nomad manages. Returns the value written, when it
/// differs from `previous`; cgroup v2 only (Nomad manages cores on v2).
pub fn sync_cpuset(nomad_cgroup: &Path, container: &CgroupFiles, previous: Option<&str>) -> Option<String> {
    let CgroupFiles::V2(dir) = container else { return None };
    let current = read(&nomad_cgroup.join("cpuset.cpus.effective"))?;
    if previous == Some(current.as_str()) {
        return None;
    }
    std::fs::write(dir.join("cpuset.cpus"), &current).ok()?;
    Some(current)
}

/// Host pids of a container's processes, from its cgroup (v2 and v1 layouts).
pub fn container_pids(container: &str) -> std::collections::BTreeSet<u32> {
    let root = Path::new("/sys/fs/cgroup");
    [
        format!("system.slice/docker-{container}.scope"),
        format!("docker/{container}"),
        format!("pids/docker/{container}"),
        format!("memory/docker/{container}"),
        format!("cpu/docker/{container}"),
    ]
    .iter()
    .find_map(|d| std::fs::read_to_string(root.join(d).join("cgroup.procs")).ok())
    .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
    .unwrap_or_default()
}

/// The cgroup files that count OOM kills for a container (v2 and v1 layouts).
pub fn oom_files(container: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    vec![
        root.join(format!("system.slice/docker-{container}.scope/memory.events")),
        root.join(format!("docker/{container}/memory.events")),
        root.join(format!("memory/docker/{container}/memory.oom_control")),
        root.join(format!("memory/system.slice/docker-{container}.scope/memory.oom_control")),
    ]
}

pub fn read_oom_kills(files: &[PathBuf]) -> Option<u64> {
    files.iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        text.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_cgroups_are_located_from_proc_pid_cgroup() {
        let root = Path::new("/sys/fs/cgroup-nonexistent");
        let v1 = "9:name=systemd:/docker/abc\n4:memory:/docker/abc\n2:cpuacct:/docker/abc\n1:cpu:/docker/abc\n0::/docker/abc\n";
        assert_eq!(
            locate_in(v1, root),
            Some(CgroupFiles::V1 {
                cpu: root.join("cpu/docker/abc"),
                cpuacct: root.join("cpuacct/docker/abc"),
                memory: root.join("memory/docker/abc"),
            })
        );
        let v2 = "0::/system.slice/docker-abc.scope\n";
        assert_eq!(locate_in(v2, root), Some(CgroupFiles::V2(root.join("system.slice/docker-abc.scope"))));
        assert_eq!(locate_in("", root), None);
    }

    #[test]
    fn shared_cores_follow_nomads_cgroup() {
        let d = tempfile::tempdir().unwrap();
        let (nomad, container) = (d.path().join("nomad"), d.path().join("container"));
        std::fs::create_dir_all(&nomad).unwrap();
        std::fs::create_dir_all(&container).unwrap();
        std::fs::write(nomad.join("cpuset.cpus.effective"), "0-3\n").unwrap();
        let c = CgroupFiles::V2(container.clone());
        assert_eq!(sync_cpuset(&nomad, &c, None).as_deref(), Some("0-3\n"));
        assert_eq!(std::fs::read_to_string(container.join("cpuset.cpus")).unwrap(), "0-3\n");
        assert_eq!(sync_cpuset(&nomad, &c, Some("0-3\n")), None, "unchanged: nothing written");
        std::fs::write(nomad.join("cpuset.cpus.effective"), "2-3\n").unwrap();
        assert_eq!(sync_cpuset(&nomad, &c, Some("0-3\n")).as_deref(), Some("2-3\n"));
        assert_eq!(std::fs::read_to_string(container.join("cpuset.cpus")).unwrap(), "2-3\n");
        let v1 = CgroupFiles::V1 { cpu: container.clone(), cpuacct: container.clone(), memory: container };
        assert_eq!(sync_cpuset(&nomad, &v1, None), None, "v1: Nomad does not manage shared cores there");
    }

    #[test]
    fn host_cpu_is_all_jiffies_in_nanoseconds() {
        let stat =
            "cpu  100 0 50 1000 0 0 0 0 0 0\ncpu0 50 0 25 500 0 0 0 0 0 0\ncpu1 50 0 25 500 0 0 0 0 0 0\nintr 1\n";
        assert_eq!(host_cpu_in(stat, 100), Some((1150 * 10_000_000, 2)));
    }

    #[test]
    fn this_process_cgroup_can_be_sampled() {
        // Whatever the host's layout, our own process is in a cgroup; its
        // counters are readable unless it is the root cgroup of v2 (no memory.current).
        let files = locate(std::process::id() as i64, Path::new("/sys/fs/cgroup")).expect("our own cgroup");
        if let Some(s) = sample(&files) {
            assert!(s.system_cpu_ns > 0 && s.online_cpus > 0);
        }
    }

    #[test]
    fn oom_counters_are_read_from_v1_and_v2_files() {
        let dir = std::env::temp_dir().join(format!("aimodel-oom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v2 = dir.join("memory.events");
        std::fs::write(&v2, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        let v1 = dir.join("memory.oom_control");
        std::fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").unwrap();
        assert_eq!(read_oom_kills(&[dir.join("missing"), v2.clone()]), Some(1));
        assert_eq!(read_oom_kills(&[v1]), Some(2));
        assert_eq!(read_oom_kills(&[dir.join("missing")]), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}

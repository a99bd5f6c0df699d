//! The standard `process_*` metrics, as Prometheus' Go and Python clients name them, read
//! from `/proc/self` at each scrape (Linux). Elsewhere, or when `/proc` cannot be read,
//! the metrics it cannot read are left out rather than reported as zero.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::encode_const;

/// Clock ticks per second when `/proc/self/auxv` does not say (`USER_HZ` on every Linux
/// architecture that tokengate ships for).
const DEFAULT_TICKS: f64 = 100.0;

/// `AT_CLKTCK` in the auxiliary vector: the kernel's `USER_HZ`.
const AT_CLKTCK: u64 = 17;

#[derive(Debug)]
pub struct Process {
    ticks_per_second: f64,
}

impl Process {
    pub fn new() -> Self {
        Self {
            ticks_per_second: clock_ticks().unwrap_or(DEFAULT_TICKS),
        }
    }
}

impl Default for Process {
    fn default() -> Self {
        Self::new()
    }
}

/// What one scrape reads.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    start_time_seconds: Option<f64>,
    threads: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let sample = self.sample();
        let metrics = [
            (
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                MetricType::Counter,
                sample.cpu_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                MetricType::Gauge,
                sample.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                MetricType::Gauge,
                sample.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                MetricType::Gauge,
                sample.start_time_seconds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                MetricType::Gauge,
                sample.threads,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                MetricType::Gauge,
                sample.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                MetricType::Gauge,
                sample.max_fds,
            ),
        ];
        for (name, help, kind, value) in metrics {
            if let Some(value) = value {
                encode_const(&mut encoder, name, help, kind, value)?;
            }
        }
        Ok(())
    }
}

impl Process {
    fn sample(&self) -> Sample {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| boot_time(&text));
        let mut sample = stat
            .as_deref()
            .map(|stat| parse_stat(stat, self.ticks_per_second, boot_time))
            .unwrap_or_default();
        sample.resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| resident_bytes(&status));
        sample.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as f64);
        sample.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| max_open_files(&limits));
        sample
    }
}

/// Fields of `/proc/self/stat` (proc(5)); the command name, in parentheses, may hold spaces.
fn parse_stat(stat: &str, ticks_per_second: f64, boot_time: Option<f64>) -> Sample {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Sample::default();
    };
    // `rest` starts at field 3 (state).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let cpu_seconds = match (field(14), field(15)) {
        (Some(user), Some(system)) => Some((user + system) / ticks_per_second),
        _ => None,
    };
    let start_time_seconds = match (field(22), boot_time) {
        (Some(start), Some(boot)) => Some(boot + start / ticks_per_second),
        _ => None,
    };
    Sample {
        cpu_seconds,
        virtual_bytes: field(23),
        start_time_seconds,
        threads: field(20),
        ..Sample::default()
    }
}

/// `btime` of `/proc/stat`: when the system booted, in seconds since the epoch.
fn boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// `VmRSS` of `/proc/self/status`, which the kernel gives in kB.
fn resident_bytes(status: &str) -> Option<f64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024.0)
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// `AT_CLKTCK` from `/proc/self/auxv`: pairs of native-endian machine words.
fn clock_ticks() -> Option<f64> {
    let auxv = std::fs::read("/proc/self/auxv").ok()?;
    const WORD: usize = std::mem::size_of::<usize>();
    auxv.chunks_exact(2 * WORD).find_map(|pair| {
        let word = |bytes: &[u8]| -> u64 {
            let mut buf = [0u8; 8];
            buf[..WORD].copy_from_slice(bytes);
            u64::from_ne_bytes(buf)
        };
        let (key, value) = (word(&pair[..WORD]), word(&pair[WORD..]));
        (key == AT_CLKTCK && value > 0).then_some(value as f64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // pid (comm with spaces) state ppid ... as proc(5) numbers them.
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[14 - 3] = "150".into(); // utime
        fields[15 - 3] = "50".into(); // stime
        fields[20 - 3] = "7".into(); // num_threads
        fields[22 - 3] = "1000".into(); // starttime
        fields[23 - 3] = "4096".into(); // vsize
        let stat = format!("42 (a (weird) name) {}", fields.join(" "));
        let sample = parse_stat(&stat, 100.0, Some(1_700_000_000.0));
        assert_eq!(sample.cpu_seconds, Some(2.0));
        assert_eq!(sample.threads, Some(7.0));
        assert_eq!(sample.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(sample.virtual_bytes, Some(4096.0));
    }

    #[test]
    fn status_limits_and_stat_are_read() {
        assert_eq!(
            resident_bytes("Name:\tx\nVmRSS:\t    1234 kB\n"),
            Some(1234.0 * 1024.0)
        );
        assert_eq!(
            max_open_files(
                "Limit                     Soft Limit           Hard Limit           Units\n\
                 Max open files            1024                 524288               files\n"
            ),
            Some(1024.0)
        );
        assert_eq!(boot_time("cpu 1 2 3\nbtime 1700000000\n"), Some(1.7e9));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_sampled() {
        let sample = Process::new().sample();
        assert!(sample.cpu_seconds.is_some());
        assert!(sample.resident_bytes.is_some_and(|b| b > 0.0));
        assert!(sample.open_fds.is_some_and(|n| n >= 3.0));
        assert!(sample.start_time_seconds.is_some_and(|t| t > 1.6e9));
        assert_eq!(clock_ticks(), Some(100.0));
    }
}

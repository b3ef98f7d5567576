//! Finding the built binaries and running them inside a namespace: long-lived
//! daemons (`s2cs`) with their output in a log file, and commands run to completion
//! (`s2uc`) under a timeout, so a hung program fails a test instead of stalling it.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::kill;
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::netns::in_netns;
use crate::registry;

/// How long [`run_in`] lets a command run before killing it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Path of the built binary `name` (e.g. "s2cs"): in `$SCISTREAM_BIN_DIR` when set,
/// else next to the running test executable's profile dir (target/<profile>/deps/x
/// -> target/<profile>/). Panics with a how-to when it is not there.
pub fn bin(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} not found: build them first: cargo build -p scistream-ctl --bins (cargo xtask test does)",
            path.display()
        );
    }
    path
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SCISTREAM_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("locating the running executable");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test binaries live in target/<profile>/deps, examples in target/<profile>/examples.
    if matches!(
        dir.file_name().and_then(OsStr::to_str),
        Some("deps" | "examples")
    ) {
        dir.pop();
    }
    dir
}

/// `ip netns exec <ns> <program>` as a Command, for callers who need more than
/// [`spawn_in`]/[`run_in`] offer (environment variables, working directory):
/// add to it, then hand it to [`Daemon::spawn`] or [`run_command`].
pub fn netns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Starts `program args...` inside namespace `ns` as a [`Daemon`].
pub fn spawn_in<S: AsRef<OsStr>>(
    ns: &str,
    program: impl AsRef<OsStr>,
    args: impl IntoIterator<Item = S>,
) -> Result<Daemon> {
    let mut cmd = netns_command(ns, program);
    cmd.args(args);
    Daemon::spawn(cmd)
}

/// Runs `program args...` inside `ns` to completion and returns its output; fails if
/// it cannot start or runs longer than [`RUN_TIMEOUT`] (it is then killed). A
/// non-zero exit is not an error here: check `output.status`.
pub fn run_in<S: AsRef<OsStr>>(
    ns: &str,
    program: impl AsRef<OsStr>,
    args: impl IntoIterator<Item = S>,
) -> Result<Output> {
    let mut cmd = netns_command(ns, program);
    cmd.args(args);
    run_command(cmd, RUN_TIMEOUT)
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it after `timeout`.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    // Drained on their own threads: a child filling one pipe while we wait on the
    // other would otherwise block forever.
    let mut out_pipe = child.stdout.take().expect("stdout is piped");
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{shown} still running after {timeout:?}, killed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// A background process whose stdout and stderr go to a log file. Dropping it stops
/// it (SIGTERM, SIGKILL after [`STOP_GRACE`]). It stays in our process group, so a
/// Ctrl-C in the terminal reaches it too. Logs are kept under
/// `$TMPDIR/scistream-testbed/` (pruned after 3 days); when dropped during a panic, the log's tail is
/// printed so a failed test shows what the daemon said.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    label: String,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
}

static LOG_COUNTER: AtomicU32 = AtomicU32::new(0);
static PRUNE_LOGS: Once = Once::new();
/// Logs are kept after a run for debugging, but not forever.
const LOG_MAX_AGE: Duration = Duration::from_secs(3 * 24 * 3600);

fn prune_old_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > LOG_MAX_AGE));
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Daemon {
    /// Spawns `cmd` (e.g. from [`netns_command`]) with its output sent to a new log file.
    pub fn spawn(mut cmd: Command) -> Result<Daemon> {
        let label = command_label(&cmd);
        let dir = std::env::temp_dir().join("scistream-testbed");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        PRUNE_LOGS.call_once(|| prune_old_logs(&dir));
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log_path = dir.join(format!("{}-{n}-{label}.log", std::process::id()));
        // One open file description for both streams (O_APPEND, shared offset),
        // so stdout and stderr interleave instead of overwriting each other.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        // A file left by an earlier process with the same pid would otherwise be appended to.
        log.set_len(0)
            .with_context(|| format!("truncating {}", log_path.display()))?;
        let log2 = log.try_clone().context("duplicating the log file handle")?;
        let shown = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        registry::add_pid(child.id());
        Ok(Daemon {
            child,
            label,
            log_path,
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the daemon printed so far (invalid UTF-8 replaced).
    pub fn log_contents(&self) -> String {
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Waits until a log line contains `needle` and returns that line; fails after
    /// `timeout` or as soon as the daemon exits without printing it.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log_contents();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if !self.is_running() {
                bail!(
                    "{} exited ({:?}) without printing {needle:?}; log:\n{log}",
                    self.label,
                    self.exit
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; log:\n{log}",
                    self.label
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// False once the process has exited (its status is then in [`Daemon::exit_status`]).
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit.is_none()
    }

    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.is_running();
        self.exit
    }

    /// Sends `signal` to the daemon (only the daemon, not its process group).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.pid()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to {}", self.label))
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(self.exit.expect("set when not running"))
    }

    /// Stops the daemon: SIGTERM, then SIGKILL after [`STOP_GRACE`]. Returns how it
    /// ended (a graceful exit shows as success or a code, a kill as a signal).
    pub fn stop(&mut self) -> ExitStatus {
        if self.is_running() {
            let _ = self.signal(Signal::SIGTERM);
            if self.wait_exit(STOP_GRACE).is_err() {
                let _ = self.child.kill();
            }
        }
        let status = match self.exit {
            Some(status) => status,
            // Drop calls this, possibly while unwinding: a panic here would abort
            // the whole test binary, so an unreapable child reports "killed".
            None => self
                .child
                .wait()
                .unwrap_or_else(|_| ExitStatus::from_raw(Signal::SIGKILL as i32)),
        };
        self.exit = Some(status);
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Unregister first: if a Ctrl-C cleanup already took the pid, it is being
        // killed there and may have been reaped and reused, so leave it alone.
        if !registry::remove_pid(self.pid()) {
            return;
        }
        self.stop();
        if std::thread::panicking() {
            let log = self.log_contents();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} lines of {} ({}) ---\n{}\n--- end of {} ---",
                tail.len(),
                self.label,
                self.log_path.display(),
                tail.join("\n"),
                self.label
            );
        }
    }
}

/// A short file-name-safe label: the program run under `ip netns exec` plus the namespace.
fn command_label(cmd: &Command) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (ns, program) = match args.as_slice() {
        [netns, exec, ns, program, ..] if netns == "netns" && exec == "exec" => {
            (ns.as_str(), program.as_str())
        }
        _ => ("", cmd.get_program().to_str().unwrap_or("daemon")),
    };
    let program = Path::new(program)
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or("daemon");
    let label = if ns.is_empty() {
        program.to_owned()
    } else {
        format!("{program}@{ns}")
    };
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Polls until a TCP connect to `addr` from inside `ns` succeeds (e.g. until `s2cs`
/// listens), or fails after `timeout` with the last connect error.
pub fn wait_for_tcp(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
    in_netns(ns, || {
        let deadline = Instant::now() + timeout;
        loop {
            let err = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!("nothing accepted TCP connections on {addr} in namespace {ns} within {timeout:?}: {err}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    })
}

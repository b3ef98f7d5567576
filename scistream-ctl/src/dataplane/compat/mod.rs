//! What the compat backends (`StunnelSubprocess`, `HaproxySubprocess`) share:
//! one real program per session, run as SciStream 1.2 runs it but supervised.
//! The child dies with s2cs (PR_SET_PDEATHSIG), its output is drained into our
//! log, its config and key files are private (0600) and deleted on release,
//! and release kills and reaps it before the session's ports are reused.

use std::ffi::OsString;
use std::fs::{self};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::dataplane::{
    Backend, DataPlaneError, Forwarder, SessionSpec, StatsSnapshot, TunnelKeying,
};

pub mod haproxy;
mod procfs;
pub mod stunnel;
mod supervise;

use supervise::{control_command, control_command_within, last_lines};
pub use supervise::{find_program, PrivateFile, SpawnContext, Supervised};

/// How long a program may take to start listening on the session's ports.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a program may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Output lines kept to explain a failed start.
const TAIL_LINES: usize = 20;

/// What a compat backend supplies: the program, its files and arguments.
pub trait Compat: Send + Sync + 'static {
    /// The `--type` name, shown in status.
    const NAME: &'static str;
    /// The executable looked up on PATH.
    const PROGRAM: &'static str;
    /// The Debian package that provides it, for the error message.
    const PACKAGE: &'static str;

    /// The files the program reads (config, keys), as (file name suffix,
    /// contents). `config` is the path the first file will have.
    fn files(
        &self,
        spec: &SessionSpec,
        listeners: &Listeners,
        targets: &[SocketAddr],
        config: &Path,
    ) -> Vec<(&'static str, String)>;

    /// Command-line arguments, given the config file's path.
    fn args(&self, config: &Path) -> Vec<OsString>;

    /// Arguments of a dry run that validates the config and exits 0, for
    /// programs whose start cannot be observed otherwise.
    fn check_args(&self, config: &Path) -> Option<Vec<OsString>>;

    /// Whether the program serves the reserved listening sockets themselves
    /// (handed over as inherited fds) or needs them closed to bind the ports.
    fn inherits_listeners(&self) -> bool;

    /// Whether a line of the program's output reports a failure (logged as
    /// a warning; everything else goes to debug).
    fn is_error_line(line: &str) -> bool;

    /// Whether a line says the program has (re)loaded its config and serves
    /// it, so a reload by signal can be waited for.
    fn is_loaded_line(line: &str) -> bool;

    /// How the running program `pid` takes new targets while it keeps its
    /// live connections.
    fn retarget(&self, config: &Path, pid: Pid, targets: &[SocketAddr]) -> Retarget;

    /// Whether the program keeps per-session counters s2cs can read with
    /// [`Compat::counters`]; without them the session's counters show as
    /// unavailable, never as zeros.
    const COUNTERS: bool = false;

    /// What the program keys the tunnel with.
    const KEYING: TunnelKeying = TunnelKeying::Plaintext;

    /// The session's counters, read from the running program.
    fn counters(&self, _config: &Path) -> io::Result<StatsSnapshot> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{} keeps no counters", Self::PROGRAM),
        ))
    }
}

/// How a program takes new targets.
pub enum Retarget {
    /// Rewrite its files, then send it this signal (it reloads in place).
    Signal(Signal),
    /// Send these lines to the program's control socket, one connection
    /// each; an answer containing any of `refusals` is a failure.
    Commands {
        socket: PathBuf,
        lines: Vec<String>,
        refusals: &'static [&'static str],
    },
}

/// The session's listening sockets: kept open (inherited fds) or closed so
/// the program can bind their addresses.
pub enum Listeners {
    Inherited(Vec<TcpListener>),
    Freed(Vec<SocketAddr>),
}

impl Listeners {
    pub fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Self::Inherited(l) => l.iter().filter_map(|l| l.local_addr().ok()).collect(),
            Self::Freed(a) => a.clone(),
        }
    }

    /// The fds a program inherits (none when it binds the ports itself).
    pub fn fds(&self) -> Vec<i32> {
        match self {
            Self::Inherited(l) => l.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect(),
            Self::Freed(_) => Vec::new(),
        }
    }
}

/// A compat backend: finds its program once, at s2cs start.
pub struct SubprocessBackend<C> {
    compat: Arc<C>,
    exe: PathBuf,
    /// Where config and key files live (0700).
    dir: PathBuf,
}

impl<C: Compat> SubprocessBackend<C> {
    pub fn new(compat: C, state_dir: &Path) -> Result<Self, DataPlaneError> {
        let exe = find_program(C::NAME, C::PROGRAM, C::PACKAGE)?;
        let dir = state_dir.join("compat");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let counters = if C::COUNTERS {
            "counters read from it"
        } else {
            "its byte counters cannot be seen"
        };
        info!(backend = C::NAME, program = %exe.display(), "compat backend: one {} process per session; {counters}", C::PROGRAM);
        Ok(Self {
            compat: Arc::new(compat),
            exe,
            dir,
        })
    }
}

impl<C: Compat> Backend for SubprocessBackend<C> {
    fn name(&self) -> &'static str {
        C::NAME
    }

    fn keying(&self) -> TunnelKeying {
        C::KEYING
    }

    fn binds_ports_itself(&self) -> bool {
        !self.compat.inherits_listeners()
    }

    fn start(
        &self,
        spec: SessionSpec,
        listeners: Vec<TcpListener>,
        targets: Vec<SocketAddr>,
    ) -> Result<Box<dyn Forwarder>, DataPlaneError> {
        let listeners = if self.compat.inherits_listeners() {
            Listeners::Inherited(listeners)
        } else {
            // The program binds these addresses itself; the ports stay
            // reserved in our pool, so no other session is given them.
            let addrs = listeners
                .iter()
                .map(TcpListener::local_addr)
                .collect::<io::Result<Vec<_>>>()?;
            drop(listeners);
            Listeners::Freed(addrs)
        };
        let ctx = SpawnContext {
            uid: spec.log_id.clone(),
            tail: Arc::default(),
            error_line: C::is_error_line,
            loaded_line: C::is_loaded_line,
            loads: Arc::default(),
        };
        // The path is on the program's command line, which any local user
        // can read (ps): a random name, never one made from the uid, which
        // is stunnel's PSK.
        let config = self
            .dir
            .join(format!("{}.{}", uuid::Uuid::new_v4().simple(), C::PROGRAM));
        let files = write_files(&*self.compat, &spec, &listeners, &targets, &config)?;
        if let Some(args) = self.compat.check_args(&config) {
            let mut check = Supervised::spawn(&self.exe, &args, &listeners.fds(), &ctx)?;
            let status = check.wait_exit(READY_TIMEOUT);
            if !status.is_some_and(|s| s.success()) {
                let _ = check.signal(Signal::SIGKILL);
                // Let the drain tasks catch the program's last words.
                std::thread::sleep(Duration::from_millis(50));
                return Err(DataPlaneError::Unsupported {
                    backend: C::NAME,
                    reason: format!("{} refused its config: {}", C::PROGRAM, last_lines(&ctx)),
                });
            }
        }
        let mut proc = Supervised::spawn(
            &self.exe,
            &self.compat.args(&config),
            &listeners.fds(),
            &ctx,
        )?;
        if let Err(e) = proc.wait_serving(&listeners, &ctx) {
            let _ = proc.signal(Signal::SIGKILL);
            return Err(DataPlaneError::Unsupported {
                backend: C::NAME,
                reason: format!("{}: {e}", C::PROGRAM),
            });
        }
        info!(uid = %spec.log_id, pid = proc.pid().as_raw(), "{} serving {:?} -> {:?}", C::PROGRAM, listeners.addrs(), targets);
        Ok(Box::new(SubprocessForwarder {
            compat: self.compat.clone(),
            spec,
            config,
            ctx,
            state: Mutex::new(State {
                listeners: Some(listeners),
                files,
                procs: vec![proc],
            }),
            last_counters: Arc::default(),
            reading: Arc::default(),
        }))
    }
}

fn write_files<C: Compat + ?Sized>(
    compat: &C,
    spec: &SessionSpec,
    listeners: &Listeners,
    targets: &[SocketAddr],
    config: &Path,
) -> io::Result<Vec<PrivateFile>> {
    let mut written = Vec::new();
    for (i, (suffix, contents)) in compat
        .files(spec, listeners, targets, config)
        .into_iter()
        .enumerate()
    {
        let path = if i == 0 {
            config.to_path_buf()
        } else {
            config.with_extension(suffix)
        };
        written.push(PrivateFile::write(path, &contents)?);
    }
    Ok(written)
}

struct State {
    /// `None` once released.
    listeners: Option<Listeners>,
    files: Vec<PrivateFile>,
    /// The serving process last; older ones finish their live connections.
    procs: Vec<Supervised>,
}

struct SubprocessForwarder<C> {
    compat: Arc<C>,
    spec: SessionSpec,
    config: PathBuf,
    ctx: SpawnContext,
    state: Mutex<State>,
    /// The program's counters at the last good reading. `stats` answers
    /// from here at once and starts a new reading on the blocking pool, so
    /// a scrape or `status` never waits on the program's socket on a
    /// runtime worker (nor with a session lock held).
    last_counters: Arc<Mutex<StatsSnapshot>>,
    /// A reading is under way.
    reading: Arc<std::sync::atomic::AtomicBool>,
}

impl<C: Compat> Forwarder for SubprocessForwarder<C> {
    fn set_targets(&self, targets: Vec<SocketAddr>) {
        let mut st = crate::lock(&self.state);
        let State {
            listeners,
            files,
            procs,
        } = &mut *st;
        let Some(listeners) = listeners.as_ref() else {
            return;
        };
        // Reap the generations that have finished.
        procs.retain_mut(|p| p.exited().is_none());
        let Some(current) = procs.last_mut() else {
            warn!(uid = %self.spec.log_id, "{} is not running; targets not applied", C::PROGRAM);
            return;
        };
        // Retargeting returns once new connections go to the new targets, so
        // a client told "updated" is not sent to the old ones.
        let result = match self.compat.retarget(&self.config, current.pid(), &targets) {
            Retarget::Signal(sig) => {
                // The new files take the same paths: the old ones must be gone
                // (their drop deletes the path) before the new ones are written.
                files.clear();
                write_files(&*self.compat, &self.spec, listeners, &targets, &self.config).and_then(
                    |new| {
                        *files = new;
                        let before = self.ctx.loads.load(std::sync::atomic::Ordering::SeqCst);
                        current.signal(sig)?;
                        current.wait_until("reload", &self.ctx, || {
                            self.ctx.loads.load(std::sync::atomic::Ordering::SeqCst) > before
                        })
                    },
                )
            }
            Retarget::Commands {
                socket,
                lines,
                refusals,
            } => lines.iter().try_for_each(|line| {
                let answer = control_command(&socket, line)?;
                if refusals.iter().any(|r| answer.contains(r)) {
                    return Err(io::Error::other(format!("{line:?}: {}", answer.trim())));
                }
                Ok(())
            }),
        };
        if let Err(e) = result {
            warn!(uid = %self.spec.log_id, error = %e, "{}: retargeting failed; the old targets stay", C::PROGRAM);
            return;
        }
        info!(uid = %self.spec.log_id, ?targets, "{} retargeted", C::PROGRAM);
    }

    fn stats(&self) -> StatsSnapshot {
        if C::COUNTERS && !self.reading.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let (compat, config, last, reading) = (
                self.compat.clone(),
                self.config.clone(),
                self.last_counters.clone(),
                self.reading.clone(),
            );
            let uid = self.spec.log_id.clone();
            let read = move || {
                match compat.counters(&config) {
                    Ok(now) => *crate::lock(&last) = now,
                    Err(e) => {
                        debug!(uid = %uid, error = %e, "{}: counters not readable; showing the last reading", C::PROGRAM)
                    }
                }
                reading.store(false, std::sync::atomic::Ordering::Release);
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(read)),
                Err(_) => read(),
            }
        }
        *crate::lock(&self.last_counters)
    }

    fn counters_observable(&self) -> bool {
        C::COUNTERS
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        let (procs, listeners, files) = {
            let mut st = crate::lock(&self.state);
            (
                std::mem::take(&mut st.procs),
                st.listeners.take(),
                std::mem::take(&mut st.files),
            )
        };
        Box::pin(async move {
            for p in procs {
                p.stop().await;
            }
            // Only now, with the programs gone, may the ports return to the pool.
            drop(listeners);
            drop(files);
            debug!(uid = %self.spec.log_id, "{} stopped and reaped; files removed", C::PROGRAM);
        })
    }
}

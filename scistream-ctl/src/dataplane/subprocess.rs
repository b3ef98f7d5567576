//! What the compat backends (`StunnelSubprocess`, `HaproxySubprocess`) share:
//! one real program per session, run as SciStream 1.2 runs it but supervised.
//! The child dies with s2cs (PR_SET_PDEATHSIG), its output is drained into our
//! log, its config and key files are private (0600) and deleted on release,
//! and release kills and reaps it before the session's ports are reused.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, info, warn, Instrument};

use super::{Backend, DataPlaneError, Forwarder, SessionSpec, StatsSnapshot, TunnelKeying};

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

/// Finds `program` on PATH, or says in one line how to get it.
pub fn find_program(
    backend: &'static str,
    program: &str,
    package: &str,
) -> Result<PathBuf, DataPlaneError> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if fs::metadata(&candidate).is_ok_and(|m| m.is_file()) {
            return Ok(candidate);
        }
    }
    Err(DataPlaneError::Unsupported {
        backend,
        reason: format!("`{program}` is not installed (not on PATH); install it (Debian: apt-get install {package}) or use --type tls or splice"),
    })
}

/// A 0600 file that is deleted when dropped.
pub struct PrivateFile {
    path: PathBuf,
}

impl PrivateFile {
    /// Writes `contents` to `path`, created 0600 (an old file there is replaced).
    pub fn write(path: PathBuf, contents: &str) -> io::Result<Self> {
        let _ = fs::remove_file(&path);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// What every spawn of one backend needs.
#[derive(Clone)]
pub struct SpawnContext {
    pub uid: String,
    /// Last lines of output of the session's programs.
    pub tail: Arc<Mutex<VecDeque<String>>>,
    pub error_line: fn(&str) -> bool,
    pub loaded_line: fn(&str) -> bool,
    /// How many "config loaded" lines the programs have printed.
    pub loads: Arc<std::sync::atomic::AtomicU64>,
}

/// One running program, killed and reaped by [`Supervised::stop`] (or killed
/// on drop, reaped by tokio).
pub struct Supervised {
    child: Child,
    pid: Pid,
}

impl Supervised {
    /// Starts `exe args` with its output drained, dying with s2cs, with the
    /// given listening fds inherited (CLOEXEC cleared in the child only).
    pub fn spawn(
        exe: &Path,
        args: &[OsString],
        inherit: &[i32],
        ctx: &SpawnContext,
    ) -> io::Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // PR_SET_PDEATHSIG fires when the *thread* that forked exits, not
        // only the process: spawns come from the registry's data-plane
        // threads (control/offload.rs) or the main thread (restore at
        // start), which live as long as s2cs. Never spawn from
        // spawn_blocking, whose threads time out.
        let parent = nix::unistd::getpid();
        let fds = inherit.to_vec();
        // SAFETY: between fork and exec only async-signal-safe calls are made
        // (prctl, getppid, fcntl) and nothing is allocated: `fds` was built
        // before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || child_setup(parent, &fds));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", exe.display())))?;
        let pid = Pid::from_raw(child.id().map(|p| p as i32).unwrap_or(0));
        let span = tracing::info_span!(parent: None, "subprocess", uid = %ctx.uid, program = %exe.display(), pid = pid.as_raw());
        if let Some(out) = child.stdout.take() {
            tokio::spawn(drain(out, ctx.clone()).instrument(span.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(drain(err, ctx.clone()).instrument(span));
        }
        Ok(Self { child, pid })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The exit status, if the program has ended (reaping it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (blocking) up to [`READY_TIMEOUT`] for `done`, failing early
    /// if the program exits.
    pub fn wait_until(
        &mut self,
        what: &str,
        ctx: &SpawnContext,
        mut done: impl FnMut() -> bool,
    ) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !done() {
            if let Some(status) = self.exited() {
                return Err(io::Error::other(format!(
                    "exited ({status}) during {what}: {}",
                    last_lines(ctx)
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no {what} within {READY_TIMEOUT:?}: {}", last_lines(ctx)),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Waits (blocking) up to `limit` for the program to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        kill(self.pid, sig).map_err(io::Error::from)
    }

    /// Waits (blocking, a few ms per poll) until the program serves every
    /// listener, or fails with why it did not. A program that binds the
    /// ports itself must hold a listening socket on each; one that inherited
    /// the sockets must have them in its epoll set (it got past its set-up).
    pub fn wait_serving(&mut self, listeners: &Listeners, ctx: &SpawnContext) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                return Err(io::Error::other(format!(
                    "exited ({status}) at start: {}",
                    last_lines(ctx)
                )));
            }
            let ready = match listeners {
                Listeners::Freed(addrs) => {
                    let inodes = socket_inodes(self.pid);
                    let listening = listening_inodes();
                    addrs.iter().all(|a| {
                        listening
                            .iter()
                            .any(|(port, inode)| *port == a.port() && inodes.contains(inode))
                    })
                }
                Listeners::Inherited(_) => {
                    let watched = epoll_watched_fds(self.pid);
                    listeners.fds().iter().all(|fd| watched.contains(fd))
                }
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "not serving {:?} after {READY_TIMEOUT:?}: {}",
                        listeners.addrs(),
                        last_lines(ctx)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL after a grace period; returns once reaped.
    pub async fn stop(mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = self.signal(Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            warn!(
                pid = self.pid.as_raw(),
                "did not exit on SIGTERM; killing it"
            );
            let _ = self.child.kill().await;
        }
    }
}

/// One command over a program's unix control socket; returns its answer.
fn control_command(socket: &Path, line: &str) -> io::Result<String> {
    control_command_within(socket, line, READY_TIMEOUT)
}

/// [`control_command`] with its own limit on the answer's wait.
pub(super) fn control_command_within(
    socket: &Path,
    line: &str,
    limit: Duration,
) -> io::Result<String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("control socket {}: {e}", socket.display()),
        )
    })?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Runs in the forked child before exec.
fn child_setup(parent: Pid, inherit: &[i32]) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    // s2cs may have died between fork and prctl: then nobody would kill us.
    if nix::unistd::getppid() != parent {
        return Err(io::Error::other("s2cs exited while starting the program"));
    }
    for fd in inherit {
        // SAFETY: the fd is a listening socket the parent keeps open for the
        // life of the session; only its flags change, in this child.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
        fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::empty()))?;
    }
    Ok(())
}

async fn drain<R: tokio::io::AsyncRead + Unpin>(r: R, ctx: SpawnContext) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if (ctx.loaded_line)(&line) {
            ctx.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if (ctx.error_line)(&line) {
            warn!("{line}");
        } else {
            debug!("{line}");
        }
        let mut tail = ctx.tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

fn last_lines(ctx: &SpawnContext) -> String {
    let tail = ctx.tail.lock().unwrap_or_else(|p| p.into_inner());
    let lines: Vec<&str> = tail
        .iter()
        .rev()
        .take(3)
        .rev()
        .map(String::as_str)
        .collect();
    if lines.is_empty() {
        "no output".into()
    } else {
        lines.join(" | ")
    }
}

/// Inodes of the sockets a process holds.
fn socket_inodes(pid: Pid) -> Vec<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The fds a process has registered in any of its epoll instances.
fn epoll_watched_fds(pid: Pid) -> Vec<i32> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        if !fs::read_link(e.path()).is_ok_and(|l| l.to_str() == Some("anon_inode:[eventpoll]")) {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        )) else {
            continue;
        };
        // "tfd:        7 events:       19 data: ..."
        out.extend(info.lines().filter_map(|l| {
            l.strip_prefix("tfd:")?
                .split_whitespace()
                .next()?
                .parse::<i32>()
                .ok()
        }));
    }
    out
}

/// (port, inode) of every listening TCP socket in this network namespace.
fn listening_inodes() -> Vec<(u16, u64)> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if let (Some(port), Ok(inode)) = (port, f[9].parse()) {
                out.push((port, inode));
            }
        }
    }
    out
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
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
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
                    Ok(now) => *last.lock().unwrap_or_else(|p| p.into_inner()) = now,
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
        *self.last_counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counters_observable(&self) -> bool {
        C::COUNTERS
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        let (procs, listeners, files) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
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

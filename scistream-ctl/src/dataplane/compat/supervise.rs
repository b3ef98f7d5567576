//! Running one compat program under supervision: finding it, its private
//! files, spawning it so it dies with s2cs, draining its output into our log,
//! and stopping it (SIGTERM, then SIGKILL after a grace) before its ports
//! are handed out again.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, warn, Instrument};

use crate::dataplane::DataPlaneError;

use super::procfs::{epoll_watched_fds, listening_inodes, socket_inodes};
use super::{Listeners, READY_TIMEOUT, STOP_GRACE, TAIL_LINES};

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
pub(super) fn control_command(socket: &Path, line: &str) -> io::Result<String> {
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
        let mut tail = crate::lock(&ctx.tail);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

pub(super) fn last_lines(ctx: &SpawnContext) -> String {
    let tail = crate::lock(&ctx.tail);
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

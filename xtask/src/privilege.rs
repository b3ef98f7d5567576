//! Running things as root: directly when we are, through `sudo -E` when we are not
//! (keeping the environment: SCISTREAM_BIN_DIR, RUST_LOG, CI).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Error};

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn has_sudo() -> bool {
    find_in_path("sudo")
}

fn find_in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A command that runs `program args` as root, or the reason it cannot.
pub struct RootCommand(Result<Command, Error>);

pub fn as_root<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> RootCommand {
    if is_root() {
        let mut cmd = Command::new(program);
        cmd.args(args);
        return RootCommand(Ok(cmd));
    }
    if !has_sudo() {
        return RootCommand(Err(anyhow!(
            "{} needs root and sudo is not installed: run this command as root",
            program.display()
        )));
    }
    let mut cmd = Command::new("sudo");
    cmd.arg("-E").arg(program).args(args);
    RootCommand(Ok(cmd))
}

impl RootCommand {
    /// Replaces this process with the command; returns only on failure.
    pub fn exec_replacing(self) -> Error {
        match self.0 {
            Ok(mut cmd) => {
                let shown = format!("{cmd:?}");
                anyhow!("starting {shown}: {}", cmd.exec())
            }
            Err(e) => e,
        }
    }

    pub fn into_command(self) -> Result<Command, Error> {
        self.0
    }
}

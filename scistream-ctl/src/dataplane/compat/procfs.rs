//! What /proc tells about a compat program: the sockets it holds, the fds it
//! polls, and the listening sockets of this network namespace, so s2cs can
//! see that the program listens on the session's ports before it says ready.

use std::fs;

use nix::unistd::Pid;

/// Inodes of the sockets a process holds.
pub(super) fn socket_inodes(pid: Pid) -> Vec<u64> {
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
pub(super) fn epoll_watched_fds(pid: Pid) -> Vec<i32> {
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
pub(super) fn listening_inodes() -> Vec<(u16, u64)> {
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

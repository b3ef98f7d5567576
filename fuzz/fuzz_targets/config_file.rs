//! `s2cs --config FILE`: TOML from an operator's file, turned into flags.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use scistream_ctl::config_file::{parse_from, ConfigError};

/// One file per fuzzing process, rewritten for every input.
fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm".into()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("scistream-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|bytes: &[u8]| {
    let path = path();
    std::fs::write(path, bytes).expect("writing the config file");
    match parse_from([
        std::ffi::OsStr::new("s2cs"),
        "--config".as_ref(),
        path.as_os_str(),
    ]) {
        Ok(args) => {
            assert!(1 <= args.port_range.start && args.port_range.start <= args.port_range.end);
            assert!(args.tunnel_timeout() >= std::time::Duration::from_secs(1));
            // Every accepted duration is bounded, so no clock arithmetic on
            // it can overflow later (an `Instant` past its range panics).
            let now = std::time::Instant::now();
            for (name, d) in args.durations() {
                assert!(
                    d.as_secs() <= scistream_ctl::config::MAX_TTL_SECS,
                    "{name} = {d:?} passed its bound"
                );
                assert!(
                    now.checked_add(d).is_some(),
                    "{name} = {d:?} overflows an Instant"
                );
            }
            assert_eq!(args.config.as_ref(), Some(path));
        }
        // Whatever is wrong came from the file, so the error names it.
        Err(e @ (ConfigError::Invalid { .. } | ConfigError::Read { .. })) => {
            assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        }
        Err(ConfigError::Cli(e)) => {
            panic!("the file made clap fail as if it were the command line: {e}")
        }
    }
});

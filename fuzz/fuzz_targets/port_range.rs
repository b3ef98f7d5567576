//! `--port_range` / `port_range = "..."`: from the command line or the config file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scistream_ctl::config::PortRange;

fuzz_target!(|text: &str| {
    match text.parse::<PortRange>() {
        Ok(r) => {
            // The allocator and the XDP guard both rely on this.
            assert!(1 <= r.start && r.start <= r.end, "{text:?} gave {r:?}");
            assert_eq!(r.to_string().parse::<PortRange>(), Ok(r));
        }
        Err(e) => assert!(e.starts_with("invalid port range"), "{e:?}"),
    }
});

//! The `ip:port` strings peers send in `hello.prod_listeners` and
//! `update.remote_listeners`, and the comma list `s2uc outbound-request` takes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scistream_ctl::addr::{cycle_to, parse_addr_list, parse_socket_addr, to_strings};

fuzz_target!(|input: (&str, u8)| {
    let (text, n) = input;
    match parse_socket_addr(text) {
        Ok(a) => {
            // What we print for an address parses back to the same address:
            // listener strings go out and come back in the next call.
            assert_eq!(parse_socket_addr(&a.to_string()), Ok(a), "{text:?}");
            assert_eq!(text.trim().parse(), Ok(a), "{text:?}");
        }
        Err(e) => assert!(
            e.contains(&format!("{text:?}")),
            "error {e:?} does not name {text:?}"
        ),
    }

    match parse_addr_list(text) {
        Ok(list) => {
            let parts = text.split(',').filter(|p| !p.trim().is_empty()).count();
            assert_eq!(list.len(), parts, "{text:?}");
            assert_eq!(
                parse_addr_list(&to_strings(&list).join(",")),
                Ok(list.clone())
            );
            let n = usize::from(n);
            let cycled = cycle_to(&list, n);
            assert_eq!(cycled.len(), n);
            for (i, a) in cycled.iter().enumerate() {
                assert_eq!(*a, list[i % list.len()]);
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
});

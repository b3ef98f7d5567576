//! Running the guard's programs on made-up frames in the kernel
//! (BPF_PROG_TEST_RUN): tests, benchmarks and start-up self checks.

use scistream_common::guard::{self as layout};

use crate::ebpf::EbpfError;

use super::*;

impl Guard {
    /// Runs the program `repeat` times on `frame` in the kernel and returns
    /// the kernel's mean time per run; for benchmarks.
    pub fn time_per_frame(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration, EbpfError> {
        Ok(
            crate::ebpf::xdp_test_run(&self.ebpf, OBJECT, layout::PROGRAM, frame, None, repeat)?
                .duration,
        )
    }

    /// Runs the XDP program once on `frame` inside the kernel
    /// (BPF_PROG_TEST_RUN), with no interface involved; maps and counters
    /// change as for a received frame. For tests and start-up self checks.
    pub fn run_on_frame(&self, frame: &[u8]) -> Result<Verdict, EbpfError> {
        let result =
            crate::ebpf::xdp_test_run(&self.ebpf, OBJECT, layout::PROGRAM, frame, None, 1)?;
        Ok(xdp_verdict(result.return_value))
    }

    /// Like [`run_on_frame`](Self::run_on_frame), on a multi-buffer frame:
    /// the first `linear` bytes in the first buffer, the rest in page-sized
    /// fragments, as a NIC with jumbo frames hands them over.
    pub fn run_on_multibuffer_frame(
        &self,
        frame: &[u8],
        linear: u32,
    ) -> Result<Verdict, EbpfError> {
        use aya::programs::{TestRun, TestRunOptions};
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex. data_end below the input size
        // makes the kernel put the rest into fragments.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&linear.to_ne_bytes());
        let options = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        let result = crate::ebpf::xdp_program(&self.ebpf, OBJECT, layout::PROGRAM)?
            .test_run(options)
            .map_err(|source| EbpfError::Program {
                program: layout::PROGRAM,
                source,
            })?;
        Ok(xdp_verdict(result.return_value))
    }

    /// Runs the tc program once on `packet` (starting at its Ethernet
    /// header) inside the kernel, as a GSO packet of `(segment size,
    /// segments)` when `gso` is given. The kernel builds a linear skb of at
    /// most a page (less head- and tailroom) for it.
    pub fn run_on_skb(&self, packet: &[u8], gso: Option<(u32, u32)>) -> Result<Verdict, EbpfError> {
        use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
        let ctx = skb_context(gso);
        let options = TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        let program: &SchedClassifier = self
            .ebpf
            .program(layout::TC_PROGRAM)
            .ok_or(EbpfError::Missing {
                object: OBJECT,
                kind: "program",
                name: layout::TC_PROGRAM,
            })?
            .try_into()
            .map_err(|source| EbpfError::Program {
                program: layout::TC_PROGRAM,
                source,
            })?;
        let result = program
            .test_run(options)
            .map_err(|source| EbpfError::Program {
                program: layout::TC_PROGRAM,
                source,
            })?;
        Ok(match result.return_value {
            TC_NEXT => Verdict::Pass,
            TC_SHOT => Verdict::Drop,
            other => Verdict::Other(other),
        })
    }
}

fn xdp_verdict(return_value: u32) -> Verdict {
    match return_value {
        XDP_PASS => Verdict::Pass,
        XDP_DROP => Verdict::Drop,
        other => Verdict::Other(other),
    }
}

/// `struct __sk_buff` (uapi, 192 bytes) as BPF_PROG_TEST_RUN's ctx_in: the
/// kernel takes only a few fields from it and wants the others zero.
fn skb_context(gso: Option<(u32, u32)>) -> Vec<u8> {
    const GSO_SEGS: usize = 164;
    const GSO_SIZE: usize = 176;
    let mut ctx = vec![0u8; 192];
    if let Some((size, segs)) = gso {
        ctx[GSO_SIZE..GSO_SIZE + 4].copy_from_slice(&size.to_ne_bytes());
        ctx[GSO_SEGS..GSO_SEGS + 4].copy_from_slice(&segs.to_ne_bytes());
    }
    ctx
}

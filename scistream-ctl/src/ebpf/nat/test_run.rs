//! Running the NAT's programs on made-up frames and packets in the kernel
//! (BPF_PROG_TEST_RUN), for tests and benchmarks: no interface involved.

use scistream_common::nat::{self as layout};

use crate::ebpf::EbpfError;

use super::*;

/// uapi `struct __sk_buff`: its size and where the GSO fields sit, the only
/// ones a test run takes here (the kernel wants every other field zero).
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_GSO_SEGS: usize = 164;
const SK_BUFF_GSO_SIZE: usize = 176;

impl Nat {
    /// Runs the program once on `frame` in the kernel (BPF_PROG_TEST_RUN),
    /// with no interface involved; maps change as for a received frame.
    /// Returns the action and the frame as the program left it.
    pub fn run_on_frame(&self, frame: &[u8]) -> Result<(Action, Vec<u8>), EbpfError> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self.test_run(frame, Some(&mut out), 1)?;
        out.truncate(result.data_size_out as usize);
        Ok((action(result.return_value), out))
    }

    /// Runs the program `repeat` times on `frame` and returns the kernel's
    /// mean time per run; for benchmarks.
    pub fn time_per_frame(
        &self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration, EbpfError> {
        Ok(self.test_run(frame, None, repeat)?.duration)
    }

    fn test_run(
        &self,
        frame: &[u8],
        data_out: Option<&mut [u8]>,
        repeat: u32,
    ) -> Result<aya::programs::TestRunResult, EbpfError> {
        crate::ebpf::xdp_test_run(&self.ebpf, OBJECT, layout::PROGRAM, frame, data_out, repeat)
    }

    /// Runs the tc form once on `packet` (an Ethernet frame) as an skb
    /// (BPF_PROG_TEST_RUN); `gso` = (segment size, segments) makes it a GSO
    /// packet, as the stack hands a veth. Returns the action and the packet.
    pub fn tc_run_on_packet(
        &self,
        packet: &[u8],
        gso: Option<(u32, u32)>,
    ) -> Result<(Action, Vec<u8>), EbpfError> {
        use aya::programs::{TestRun, TestRunOptions};
        let mut ctx = [0u8; SK_BUFF_SIZE];
        if let Some((size, segs)) = gso {
            ctx[SK_BUFF_GSO_SEGS..SK_BUFF_GSO_SEGS + 4].copy_from_slice(&segs.to_ne_bytes());
            ctx[SK_BUFF_GSO_SIZE..SK_BUFF_GSO_SIZE + 4].copy_from_slice(&size.to_ne_bytes());
        }
        let mut out = vec![0u8; packet.len() + 256];
        let program = self
            .ebpf
            .program(layout::TC_PROGRAM)
            .ok_or(EbpfError::Missing {
                object: OBJECT,
                kind: "program",
                name: layout::TC_PROGRAM,
            })?;
        let program: &aya::programs::SchedClassifier = program
            .try_into()
            .map_err(crate::ebpf::xdp_error(layout::TC_PROGRAM))?;
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        };
        let result = program
            .test_run(options)
            .map_err(crate::ebpf::xdp_error(layout::TC_PROGRAM))?;
        out.truncate(result.data_size_out as usize);
        let action = match result.return_value {
            TC_ACT_OK => Action::Pass,
            TC_ACT_SHOT => Action::Drop,
            TC_ACT_REDIRECT => Action::Forward,
            other => Action::Other(other),
        };
        Ok((action, out))
    }
}

//! The registry on real sockets, without root.

use super::*;

mod real_sockets;

//! The data port allocator. A port counts as free only if binding it works
//! right now (another process may hold it); the bound listener is what the
//! session keeps, so nobody can take the port between allocation and use.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use crate::config::PortRange;

use super::error::ControlError;

/// Ports of one session; they go back to the pool when this is dropped.
pub struct Reservation {
    pub ports: Vec<u16>,
    pub listeners: Vec<TcpListener>,
    pool: Arc<Mutex<BTreeSet<u16>>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = crate::lock(&self.pool);
        for p in &self.ports {
            used.remove(p);
        }
    }
}

impl Reservation {
    /// Hands the listening sockets to the data plane; the ports stay reserved
    /// until the reservation itself is dropped.
    pub fn take_listeners(&mut self) -> Vec<TcpListener> {
        std::mem::take(&mut self.listeners)
    }
}

pub struct PortAllocator {
    range: PortRange,
    bind_ip: IpAddr,
    used: Arc<Mutex<BTreeSet<u16>>>,
}

impl PortAllocator {
    /// `listener_ip` is bound when it is an address of this host; otherwise
    /// (a NAT or container address advertised to peers) the wildcard of its
    /// family is bound instead.
    pub fn new(range: PortRange, listener_ip: IpAddr) -> Self {
        let bind_ip = if listener_ip.is_unspecified() || TcpListener::bind((listener_ip, 0)).is_ok()
        {
            listener_ip
        } else {
            let any: IpAddr = if listener_ip.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            tracing::warn!(%listener_ip, bind = %any, "listener_ip is not an address of this host; data listeners bind the wildcard address");
            any
        };
        Self {
            range,
            bind_ip,
            used: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Reserves `n` ports, all or nothing.
    pub fn allocate(&self, n: usize) -> Result<Reservation, ControlError> {
        let mut used = crate::lock(&self.used);
        let mut ports = Vec::with_capacity(n);
        let mut listeners = Vec::with_capacity(n);
        for port in self.range.start..=self.range.end {
            if listeners.len() == n {
                break;
            }
            if used.contains(&port) {
                continue;
            }
            match bind(SocketAddr::new(self.bind_ip, port)) {
                Ok(l) => {
                    ports.push(port);
                    listeners.push(l);
                }
                Err(e) => tracing::debug!(port, error = %e, "port busy, skipped"),
            }
        }
        if listeners.len() < n {
            // The listeners bound so far close when dropped here: nothing stays half-allocated.
            return Err(ControlError::PortsExhausted {
                range: self.range.to_string(),
                wanted: n,
                free: listeners.len(),
            });
        }
        used.extend(ports.iter().copied());
        Ok(Reservation {
            ports,
            listeners,
            pool: self.used.clone(),
        })
    }

    /// Reserves exactly `ports`, all or nothing: a session restored after a
    /// restart must keep the listeners its peers were told about.
    pub fn reserve(&self, ports: &[u16]) -> Result<Reservation, ControlError> {
        let mut used = crate::lock(&self.used);
        let mut listeners = Vec::with_capacity(ports.len());
        for &port in ports {
            let why = if !(self.range.start..=self.range.end).contains(&port) {
                format!("outside --port_range {}", self.range)
            } else if used.contains(&port) || ports.iter().filter(|p| **p == port).count() > 1 {
                "held by another session".to_string()
            } else {
                match bind(SocketAddr::new(self.bind_ip, port)) {
                    Ok(l) => {
                        listeners.push(l);
                        continue;
                    }
                    Err(e) => e.to_string(),
                }
            };
            return Err(ControlError::FailedPrecondition(format!(
                "port {port} cannot be reserved: {why}"
            )));
        }
        used.extend(ports.iter().copied());
        Ok(Reservation {
            ports: ports.to_vec(),
            listeners,
            pool: self.used.clone(),
        })
    }

    /// Binds a reservation's ports again after its listeners were closed
    /// (a backend that binds the ports itself failed to start): the session
    /// keeps the listeners its clients were told about.
    pub fn rebind(&self, r: &mut Reservation) -> Result<(), ControlError> {
        let mut listeners = Vec::with_capacity(r.ports.len());
        for &port in &r.ports {
            let l = bind(SocketAddr::new(self.bind_ip, port)).map_err(|e| {
                ControlError::FailedPrecondition(format!(
                    "port {port} could not be bound again: {e}"
                ))
            })?;
            listeners.push(l);
        }
        r.listeners = listeners;
        Ok(())
    }

    pub fn in_use(&self) -> usize {
        crate::lock(&self.used).len()
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // SO_REUSEADDR lets a released port be reused while old connections sit in
    // TIME_WAIT, but still fails while anyone listens on it.
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(false).ok();
    }
    s.set_cloexec(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    //! Fixed ports in 28500-28600, below the ephemeral range (32768-60999 by
    //! default), so that no outgoing connection elsewhere can hold one.
    use super::*;

    fn alloc(range: (u16, u16)) -> PortAllocator {
        PortAllocator::new(
            PortRange {
                start: range.0,
                end: range.1,
            },
            "127.0.0.1".parse().unwrap(),
        )
    }

    #[test]
    fn ports_return_to_the_pool_when_the_reservation_drops() {
        let a = alloc((28500, 28503));
        let r = a.allocate(4).unwrap();
        assert_eq!(r.ports, vec![28500, 28501, 28502, 28503]);
        assert!(a.allocate(1).is_err());
        drop(r);
        assert_eq!(a.in_use(), 0);
        assert_eq!(a.allocate(2).unwrap().ports, vec![28500, 28501]);
    }

    #[test]
    fn a_port_held_by_someone_else_is_skipped() {
        let _other = TcpListener::bind("127.0.0.1:28511").unwrap();
        let a = alloc((28510, 28513));
        let r = a.allocate(3).unwrap();
        assert_eq!(r.ports, vec![28510, 28512, 28513]);
    }

    #[test]
    fn exact_ports_are_reserved_or_refused_whole() {
        let a = alloc((28530, 28535));
        let r = a.reserve(&[28533, 28531]).unwrap();
        assert_eq!(r.ports, vec![28533, 28531]);
        let _other = TcpListener::bind("127.0.0.1:28534").unwrap();
        for bad in [&[28532, 28534][..], &[28532, 28533], &[28532, 28600]] {
            assert!(
                matches!(a.reserve(bad), Err(ControlError::FailedPrecondition(_))),
                "{bad:?}"
            );
        }
        assert_eq!(a.in_use(), 2, "refused calls reserved nothing");
        assert!(
            TcpListener::bind("127.0.0.1:28532").is_ok(),
            "28532 was let go"
        );
    }

    #[test]
    fn exhaustion_allocates_nothing() {
        let a = alloc((28520, 28522));
        let _r = a.allocate(2).unwrap();
        let e = a.allocate(2).err().unwrap();
        assert!(
            matches!(e, ControlError::PortsExhausted { wanted: 2, .. }),
            "{e}"
        );
        assert_eq!(a.in_use(), 2, "the failed call reserved nothing");
        // and the free port is really free (its listener was closed)
        assert!(TcpListener::bind("127.0.0.1:28522").is_ok());
    }
}

//! Moving nested guests: the zero-copy handover between two guest
//! hypervisors on one host, its orchestration and rescue, copy and pre-copy
//! modes, and host-to-host migration over TCP.

pub mod batch;
pub mod copy;
pub mod handover;
pub mod handover_state;
pub mod link;
pub mod mode;
pub mod region_desc;
pub mod rejuvenate;
pub mod remote;
pub mod report;
pub mod rescue;
pub mod reuse;
pub mod tls;
pub mod transport;
pub mod uffd;
pub mod verify;
pub mod wire;

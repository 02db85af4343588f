//! The control plane under the VMM: the rejuvenation policy, the events
//! file, jobs, metrics counters, the status tree and introspection of
//! running nested guests. The API that serves them is a layer up, in `api`.

pub mod events;
pub mod inspect;
pub mod jobs;
pub mod metrics;
pub mod policy;
pub mod status;

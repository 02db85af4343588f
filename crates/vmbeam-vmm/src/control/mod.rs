//! The control plane: the API server and client, the rejuvenation policy,
//! the events file and introspection of running nested guests.

pub mod api;
pub mod events;
pub mod http;
pub mod inspect;
pub mod jobs;
pub mod metrics;
pub mod policy;

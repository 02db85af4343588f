//! The base layer: what every other layer builds on and that knows nothing
//! of VMs — ranked locks with deadlines, progress and cancellation of long
//! operations, and the parsing of sizes.

pub mod progress;
pub mod size;
pub mod sync;

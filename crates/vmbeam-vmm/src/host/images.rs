//! The guest images a VMM runs: the guest hypervisor ELF and the nested
//! workloads, flattened once at start-up so every host VM gets them cheaply.

use crate::host::loader::{self, FlatImage, LoaderError};
use vmbeam_abi::boot::workload;
use vmbeam_abi::l2;

/// Guest hypervisor plus workload modules.
#[derive(Debug, Clone)]
pub struct Images {
    /// The guest hypervisor ELF.
    pub hypervisor: Vec<u8>,
    /// Workload modules (kind, image), in boot-info module order.
    pub modules: Vec<(u32, FlatImage)>,
}

impl Images {
    /// Checks and flattens the workload ELFs.
    pub fn new(hypervisor: Vec<u8>, memtouch: &[u8], ticker: &[u8]) -> Result<Images, LoaderError> {
        let hi = l2::IMAGE_BASE + l2::MAX_IMAGE;
        Ok(Images {
            hypervisor,
            modules: vec![
                (
                    workload::MEMTOUCH,
                    loader::flatten("memtouch workload", memtouch, l2::IMAGE_BASE, hi)?,
                ),
                (
                    workload::TICKER,
                    loader::flatten("ticker workload", ticker, l2::IMAGE_BASE, hi)?,
                ),
            ],
        })
    }

    /// Adds a workload image of `kind` (from its ELF).
    pub fn add_module(&mut self, kind: u32, what: &str, elf: &[u8]) -> Result<(), LoaderError> {
        let hi = l2::IMAGE_BASE + l2::MAX_IMAGE;
        let img = loader::flatten(what, elf, l2::IMAGE_BASE, hi)?;
        self.modules.push((kind, img));
        Ok(())
    }

    /// Module index of a workload kind.
    pub fn module_index(&self, kind: u32) -> Option<u32> {
        self.modules
            .iter()
            .position(|(k, _)| *k == kind)
            .map(|i| i as u32)
    }
}

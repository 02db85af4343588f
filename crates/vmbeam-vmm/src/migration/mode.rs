//! How nested memory moves in a rejuvenation: zero-copy (remapped), copy
//! or pre-copy. Its own file so that the handover (which acts on it) and
//! the orchestration (which chooses it) both sit above it.

/// How nested memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Pages are remapped into the successor; nothing is copied.
    ZeroCopy,
    /// Stop-and-copy through L0.
    Copy,
    /// Iterative pre-copy with dirty logging.
    Precopy,
}

impl Mode {
    /// Name as on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::ZeroCopy => "zero-copy",
            Mode::Copy => "copy",
            Mode::Precopy => "precopy",
        }
    }
}

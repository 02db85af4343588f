//! What names of host VM lines and of nested guests may be. Both name
//! console files (`<line>.l1` and `<guest>`), so the two forms must never meet:
//! every path that creates a line or a guest (the CLI, the API, VM_CREATE,
//! an incoming migration) checks here.

use vmbeam_abi::hypercall::Status;

/// Checks a host VM line name: 1 to [`vmbeam_abi::NAME_LEN`] letters,
/// digits, '-' or '_'. The error says what is allowed.
pub fn check_line_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > vmbeam_abi::NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "bad host VM name '{}': use 1 to {} letters, digits, '-' or '_'",
            name.escape_debug(),
            vmbeam_abi::NAME_LEN
        ));
    }
    Ok(())
}

/// Checks a nested VM name as VM_CREATE receives it (`data[..16]`):
/// NUL-padded, non-empty, UTF-8, and only `[A-Za-z0-9._-]`; it may not
/// start with '.' nor end in `.l1`, the form of host VM console file
/// names, so a guest hypervisor cannot write into a host VM's console.
pub fn check_name(raw: &[u8; vmbeam_abi::NAME_LEN]) -> Result<&str, Status> {
    let n = vmbeam_abi::name_from_bytes(raw).ok_or(Status::BadArg)?;
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        || n.starts_with('.')
    {
        return Err(Status::BadArg);
    }
    if n.ends_with(crate::host::console::L1_SUFFIX) {
        return Err(Status::BadArg);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        let n = |s: &[u8]| {
            let mut b = [0u8; vmbeam_abi::NAME_LEN];
            b[..s.len()].copy_from_slice(s);
            b
        };
        assert_eq!(check_name(&n(b"l2-0")), Ok("l2-0"));
        assert_eq!(check_name(&n(b"a.b_c-D9")), Ok("a.b_c-D9"));
        assert_eq!(check_name(&[b'x'; 16]), Ok("xxxxxxxxxxxxxxxx"));
        assert_eq!(check_name(&n(b"l2-gx")), Ok("l2-gx"));
        assert_eq!(check_name(&n(b"hv0-g2")), Ok("hv0-g2"));
        assert_eq!(check_name(&n(b"a.l12")), Ok("a.l12"));
        for bad in [
            &b""[..],
            b"a b",
            b"a/b",
            b"a\n",
            b"\xff",
            b"\xc3\xa9",
            b"hv0.l1",
            b".l1",
            b".hidden",
        ] {
            assert_eq!(check_name(&n(bad)), Err(Status::BadArg), "{bad:?}");
        }
    }

    #[test]
    fn line_names_are_checked() {
        assert!(check_line_name("hv0").is_ok());
        assert!(check_line_name("a-b_C9").is_ok());
        assert!(check_line_name(&"x".repeat(16)).is_ok());
        for bad in ["", "a b", "a/b", "a.b", "é", &"x".repeat(17)] {
            assert!(check_line_name(bad).is_err(), "{bad:?}");
        }
    }
}

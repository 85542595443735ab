//! One module per command of the command line ([`crate::cli`] parses it): each has an
//! `execute` that prints its report and returns the exit code.

pub mod check;
pub mod install;
pub mod refresh;
pub mod run;
pub mod status;

/// Exit code for a bad configuration file (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

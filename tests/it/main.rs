//! Integration tests against a real PostgreSQL (a throwaway cluster started by [`harness`]).
//! One test binary, one module per concern.

mod admin;
mod alerts;
mod analytics;
mod bounded;
mod capture;
mod cli;
mod daemon;
mod deploy;
mod discovery;
mod faults;
mod handover;
mod harness;
mod hostile;
mod logical;
mod native;
mod observe;
mod partitioned;
mod prometheus;
mod proxy;
mod replicas;
mod tls;

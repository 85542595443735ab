//! `mvrefresh run`: the daemon, until SIGTERM/SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use crate::config::Config;
use crate::daemon;
use crate::stats::Stats;

use super::EXIT_CONFIG;

pub async fn execute(config: Config) -> anyhow::Result<ExitCode> {
    if let Some(problem) = config.http.exposure_problem() {
        eprintln!("mvrefresh: {problem}");
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    daemon::run(
        config,
        Arc::new(Stats::default()),
        crate::shutdown::signal(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
